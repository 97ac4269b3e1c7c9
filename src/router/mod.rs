//! Cost-aware routing between qpai's own models and OpenAI, Azure OpenAI and
//! OpenAI-compatible servers (issue 5, in progress): so far the routing
//! catalog (deployments, prices, capabilities, quality per task) and exact
//! money arithmetic. Not yet wired into the server.

pub mod catalog;
pub mod cost;

pub use catalog::{Capability, Deployment, ProviderKind, RouterCatalog};
pub use cost::{Prices, Usd};
