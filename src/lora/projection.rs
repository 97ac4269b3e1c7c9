//! The projections of a decoder layer, by their PEFT names.

/// The projections of a decoder layer that LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "q_proj" => Projection::Q,
            "k_proj" => Projection::K,
            "v_proj" => Projection::V,
            "o_proj" => Projection::O,
            "gate_proj" => Projection::Gate,
            "up_proj" => Projection::Up,
            "down_proj" => Projection::Down,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }
}
