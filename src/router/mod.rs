//! Cost-aware routing between qpai's own models and OpenAI, Azure OpenAI and
//! OpenAI-compatible servers (issue 5, in progress): so far the routing
//! catalog (deployments, prices, capabilities, quality per task), exact
//! money arithmetic and the upstream client. Not yet wired into the server.

pub mod catalog;
pub mod cost;
pub mod upstream;

pub use catalog::{Capability, Deployment, ProviderKind, RouterCatalog};
pub use cost::{Prices, Usd};
