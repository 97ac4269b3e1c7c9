//! A GGUF file's header, read by candle and then checked for what candle
//! leaves unchecked before a tensor is read: each tensor's element count and
//! byte size fit the machine's arithmetic, and its data lies inside the file.
//! (A shape whose element count overflows made candle panic while reading the
//! tensor; an empty tensor made it build a slice from a dangling, misaligned
//! pointer; a tensor past the end of the file failed only at that point.)

use std::io::{Read, Seek, SeekFrom};

use anyhow::bail;
use candle_core::quantized::gguf_file::Content;

/// The header and metadata of the GGUF file in `reader`, every tensor's
/// extent checked.
pub fn read_gguf<R: Read + Seek>(reader: &mut R) -> anyhow::Result<Content> {
    let content = Content::read(reader).map_err(|e| anyhow::anyhow!("{e}"))?;
    let file_len = reader.seek(SeekFrom::End(0))?;
    for (name, info) in &content.tensor_infos {
        let dtype = info.ggml_dtype;
        let elements = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        let bytes = elements
            .filter(|n| n % dtype.block_size() == 0)
            .and_then(|n| (n / dtype.block_size()).checked_mul(dtype.type_size()));
        let Some(bytes) = bytes.filter(|&b| b > 0) else {
            bail!(
                "tensor {name}: shape {:?} is not a whole, non-zero number of {dtype:?} blocks of addressable size",
                info.shape.dims()
            );
        };
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes as u64));
        if end.is_none_or(|end| end > file_len) {
            bail!(
                "tensor {name}: its {bytes} bytes at offset {} lie past the end of the file ({file_len} bytes)",
                info.offset
            );
        }
    }
    Ok(content)
}
