//! The official openai Python package against a running `qpai serve` (filled in below).
