//! Where file contents live: a seam (`BlobStore`) with a local-directory
//! store behind it, so that an object store (S3, as the sites use) can
//! hold them instead. A blob is written whole or not at all: to a
//! temporary name, synced, then renamed into place.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::future::BoxFuture;

/// Whole-object storage by key.
pub trait BlobStore: Send + Sync {
    fn put<'a>(&'a self, key: &'a str, content: Bytes) -> BoxFuture<'a, std::io::Result<()>>;
    /// The content, or `NotFound`.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, std::io::Result<Bytes>>;
    /// Removes the blob; one that is not there is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, std::io::Result<()>>;
}

/// Blobs as files in one directory.
pub struct LocalBlobs {
    dir: PathBuf,
}

impl LocalBlobs {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The path of `key`; keys are qpai's own ids, checked anyway.
    fn path(&self, key: &str) -> std::io::Result<PathBuf> {
        let safe = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
        if !safe {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("not a blob key: {key:?}"),
            ));
        }
        Ok(self.dir.join(key))
    }
}

fn write_whole(dir: &Path, path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let partial = path.with_extension("partial");
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(content)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

impl BlobStore for LocalBlobs {
    fn put<'a>(&'a self, key: &'a str, content: Bytes) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let path = self.path(key)?;
            let dir = self.dir.clone();
            tokio::task::spawn_blocking(move || write_whole(&dir, &path, &content))
                .await
                .map_err(std::io::Error::other)?
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, std::io::Result<Bytes>> {
        Box::pin(async move { Ok(Bytes::from(tokio::fs::read(self.path(key)?).await?)) })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            match tokio::fs::remove_file(self.path(key)?).await {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
                _ => Ok(()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blobs_are_written_whole_read_back_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = LocalBlobs::new(dir.path().join("files"));
        blobs
            .put("file-a", Bytes::from_static(b"{}\n"))
            .await
            .unwrap();
        assert_eq!(&blobs.get("file-a").await.unwrap()[..], b"{}\n");
        assert!(!dir.path().join("files/file-a.partial").exists());
        blobs.delete("file-a").await.unwrap();
        blobs.delete("file-a").await.unwrap();
        let missing = blobs.get("file-a").await.unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        let outside = blobs.put("../x", Bytes::new()).await.unwrap_err();
        assert_eq!(outside.kind(), std::io::ErrorKind::InvalidInput);
    }
}
