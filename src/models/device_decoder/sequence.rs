//! One sequence on a device decoder: a KV slot, its position, its adapter.

use std::sync::Arc;

use super::DeviceDecoder;
use crate::lora::UnmergedAdapter;
use crate::models::SequenceModel;

pub struct DeviceSequence {
    decoder: Arc<DeviceDecoder>,
    pub(super) slot: usize,
    pub(super) position: usize,
    adapter: Option<Arc<UnmergedAdapter>>,
}

impl DeviceSequence {
    /// A fresh sequence in a free KV slot; fails when every slot is in use
    /// (admission reserves slots first, so a served request finds one).
    pub fn new(
        decoder: Arc<DeviceDecoder>,
        adapter: Option<Arc<UnmergedAdapter>>,
    ) -> candle_core::Result<Self> {
        if let Some(adapter) = &adapter
            && adapter.device_factors().is_none()
        {
            candle_core::bail!("the adapter was prepared for another engine");
        }
        let slot = decoder.take_slot().ok_or_else(|| {
            candle_core::Error::Msg(format!("all {} KV slots are in use", decoder.kv_slots()))
        })?;
        Ok(Self {
            decoder,
            slot,
            position: 0,
            adapter,
        })
    }

    pub(super) fn adapter(&self) -> Option<&Arc<UnmergedAdapter>> {
        self.adapter.as_ref()
    }
}

impl Drop for DeviceSequence {
    fn drop(&mut self) {
        self.decoder.release_slot(self.slot);
    }
}

impl SequenceModel for DeviceSequence {
    fn forward(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        let decoder = self.decoder.clone();
        let mut logits = decoder.forward_batch(&mut [self], &[tokens])?;
        logits
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("no logits".into()))
    }

    fn position(&self) -> usize {
        self.position
    }

    /// A copy in a slot of its own. Admission reserves a slot for every
    /// choice of a request, so one is free; where none is (or the copy
    /// fails), the fork fails its first step instead.
    fn fork(&self) -> Box<dyn SequenceModel> {
        let copy = Self::new(self.decoder.clone(), self.adapter.clone()).and_then(|mut copy| {
            self.decoder
                .copy_slot(self.slot, copy.slot, self.position)?;
            copy.position = self.position;
            Ok(copy)
        });
        match copy {
            Ok(copy) => Box::new(copy),
            Err(error) => Box::new(FailedFork {
                error: error.to_string(),
                position: self.position,
            }),
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// A fork that could not be made: its first step reports why.
struct FailedFork {
    error: String,
    position: usize,
}

impl SequenceModel for FailedFork {
    fn forward(&mut self, _tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        Err(candle_core::Error::Msg(format!(
            "this choice could not be started: {}",
            self.error
        )))
    }

    fn position(&self) -> usize {
        self.position
    }

    fn fork(&self) -> Box<dyn SequenceModel> {
        Box::new(Self {
            error: self.error.clone(),
            position: self.position,
        })
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
