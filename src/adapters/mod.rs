//! LoRA adapters as the server uses them, over qpai's models: the
//! registry (which adapters exist, which are resident, per tenant), the
//! adapter eval against its base and the adapter bench. The adapters'
//! weights and their math are `crate::lora`, which knows no model.

pub mod bench;
pub mod registry;
