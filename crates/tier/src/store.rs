//! Objects on the secondary tier. An object is written once, under a key unique to one migration
//! attempt (`files/FILE/ATTEMPT`, both 16 hex digits), streamed in parts, and hashed with blake3
//! on the way; nothing overwrites it (a second write of a key is refused). A stub names the key,
//! the size and the hash, and a reader checks what it recalls against them.

use std::ops::Range;
use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use crate::rows;

/// Bytes per part of a streamed upload.
pub const PART_BYTES: usize = 8 << 20;

/// What went wrong on the tier, with the object it concerns.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("the tier object {key}: {source}")]
    Store {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("the tier object {key} is missing")]
    Missing { key: String },
    #[error("the tier object {key} has {found} bytes; its stub says {expected}")]
    Size { key: String, found: u64, expected: u64 },
    #[error("the tier object {key} does not hash to its stub's blake3 (found {found})")]
    Checksum { key: String, found: String },
    #[error("the tier cannot be opened at {place}: {reason}")]
    Open { place: String, reason: String },
    #[error(
        "row {row} of the tier object {key} does not match the crc32c recorded when it was written (found \
         {found:08x}, recorded {expected:08x})"
    )]
    RowChecksum { key: String, row: u64, found: u32, expected: u32 },
    #[error("the row checksums of the tier object {key} cannot be used: {reason}")]
    RowSums { key: String, reason: String },
}

fn store_error(key: &str, source: object_store::Error) -> TierError {
    match source {
        object_store::Error::NotFound { .. } => TierError::Missing { key: key.to_string() },
        source => TierError::Store { key: key.to_string(), source },
    }
}

/// An object written: its size and blake3 hash, and how many rows' checksums were written
/// beside it (0: none were asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub size: u64,
    pub blake3: [u8; 32],
    pub rows: u64,
}

/// One object on the tier, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// When it was last written, ms since the Unix epoch.
    pub written_ms: u64,
}

/// Where a cluster's secondary tier is, as a server's config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A directory every server reaches (the default: `tier` beside the data directories).
    Dir(std::path::PathBuf),
    /// An S3 bucket (`s3://BUCKET`), at `endpoint` if not AWS's; credentials from the
    /// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
    S3 { bucket: String, endpoint: Option<String>, region: String },
}

/// The region an S3 tier uses when its config names none.
pub const S3_REGION_DEFAULT: &str = "us-east-1";

impl Place {
    /// `s3://BUCKET` or a directory.
    pub fn parse(text: &str, endpoint: Option<String>, region: Option<String>) -> Result<Place, String> {
        match text.strip_prefix("s3://") {
            Some(bucket) => {
                let bucket = bucket.trim_end_matches('/');
                if bucket.is_empty() || bucket.contains('/') {
                    return Err(format!("{text} does not name a bucket: give s3://BUCKET"));
                }
                if !S3_BUILT {
                    return Err(format!(
                        "{text}: this stripelock was built without S3; build it with `cargo build --release --features s3`"
                    ));
                }
                let region = region.unwrap_or_else(|| S3_REGION_DEFAULT.to_string());
                Ok(Place::S3 { bucket: bucket.to_string(), endpoint, region })
            }
            None if endpoint.is_some() => {
                Err(format!("a tier endpoint is for an s3:// tier, not the directory {text}"))
            }
            None => Ok(Place::Dir(text.into())),
        }
    }

    /// Opens the tier.
    pub fn open(&self) -> Result<Tier, TierError> {
        match self {
            Place::Dir(dir) => Tier::local(dir),
            #[cfg(feature = "s3")]
            Place::S3 { bucket, endpoint, region } => Tier::s3(bucket, endpoint.as_deref(), region),
            #[cfg(not(feature = "s3"))]
            Place::S3 { bucket, .. } => Err(TierError::Open {
                place: format!("s3://{bucket}"),
                reason: "this stripelock was built without S3 (`--features s3`)".into(),
            }),
        }
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Dir(d) => write!(f, "{}", d.display()),
            Place::S3 { bucket, endpoint: Some(e), .. } => write!(f, "s3://{bucket} at {e}"),
            Place::S3 { bucket, .. } => write!(f, "s3://{bucket}"),
        }
    }
}

/// Whether this build reaches S3 (the `s3` feature).
pub const S3_BUILT: bool = cfg!(feature = "s3");

/// The secondary tier.
#[derive(Debug, Clone)]
pub struct Tier {
    store: Arc<dyn ObjectStore>,
    /// Where it is, for messages.
    place: String,
    /// A local tier's directory (its interrupted uploads are files of its own to sweep).
    root: Option<std::path::PathBuf>,
}

impl Tier {
    /// A tier in directory `dir` (made if missing).
    pub fn local(dir: &FsPath) -> Result<Tier, TierError> {
        let open = |reason: String| TierError::Open { place: dir.display().to_string(), reason };
        std::fs::create_dir_all(dir).map_err(|e| open(e.to_string()))?;
        let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| open(e.to_string()))?;
        Ok(Tier { store: Arc::new(store), place: dir.display().to_string(), root: Some(dir.to_path_buf()) })
    }

    /// A tier over any object store (tests use `InMemory`; S3 comes through here).
    pub fn over(store: Arc<dyn ObjectStore>, place: impl Into<String>) -> Tier {
        Tier { store, place: place.into(), root: None }
    }

    /// An S3 bucket (`s3` feature): `endpoint` for an S3-protocol server other than AWS's.
    #[cfg(feature = "s3")]
    pub fn s3(bucket: &str, endpoint: Option<&str>, region: &str) -> Result<Tier, TierError> {
        // The S3 client's HTTPS is built without a provider of its own: ring is the process's
        // (the one the cluster's TLS uses too). Already made by an earlier call: nothing to do.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).with_region(region);
        if let Some(e) = endpoint {
            b = b.with_endpoint(e).with_allow_http(true);
        }
        let store =
            b.build().map_err(|e| TierError::Open { place: format!("s3://{bucket}"), reason: e.to_string() })?;
        Ok(Tier { store: Arc::new(store), place: format!("s3://{bucket}"), root: None })
    }

    pub fn place(&self) -> &str {
        &self.place
    }

    /// The key of attempt `attempt` at migrating file `file`.
    pub fn key(file: u64, attempt: u64) -> String {
        format!("files/{file:016x}/{attempt:016x}")
    }

    /// Writes `parts` as the object `key`, hashing them; refused if `key` exists.
    pub async fn put(&self, key: &str, parts: impl IntoIterator<Item = Bytes>) -> Result<Written, TierError> {
        let mut w = self.writer(key).await?;
        for part in parts {
            w.write(part).await?;
        }
        w.finish().await
    }

    /// A streamed write of the object `key`: `write` its bytes in order, then `finish`.
    pub async fn writer(&self, key: &str) -> Result<ObjectWriter, TierError> {
        let path = Path::from(key);
        match self.store.head(&path).await {
            Ok(_) => {
                return Err(TierError::Store {
                    key: key.to_string(),
                    source: object_store::Error::AlreadyExists {
                        path: key.to_string(),
                        source: "written before".into(),
                    },
                });
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_error(key, e)),
        }
        let upload = self.store.put_multipart(&path).await.map_err(|e| store_error(key, e))?;
        Ok(ObjectWriter {
            key: key.to_string(),
            store: self.store.clone(),
            rows: None,
            root: self.root.clone(),
            upload: WriteMultipart::new_with_chunk_size(upload, PART_BYTES),
            hasher: blake3::Hasher::new(),
            size: 0,
        })
    }

    /// Bytes `range` of object `key` (cut at its end).
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, TierError> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        self.store.get_range(&Path::from(key), range).await.map_err(|e| store_error(key, e))
    }

    /// Rows `rows` of object `key` (rows of `row_bytes`, the last cut at the object's `size`),
    /// each checked against the crc32c written beside the object. An object written without row
    /// checksums (by a build before them) is checked for its length only. Answers the bytes and
    /// whether they were checked row by row.
    pub async fn get_rows(
        &self,
        key: &str,
        size: u64,
        row_bytes: u64,
        rows: Range<u64>,
    ) -> Result<(Bytes, bool), TierError> {
        let (start, end) = ((rows.start * row_bytes).min(size), (rows.end * row_bytes).min(size));
        let (data, sums) =
            futures::try_join!(self.get_range(key, start..end), self.row_sums(key, size, row_bytes, rows.clone()))?;
        if data.len() as u64 != end - start {
            return Err(TierError::Size { key: key.to_string(), found: start + data.len() as u64, expected: size });
        }
        let Some(sums) = sums else { return Ok((data, false)) };
        for ((row, expected), bytes) in rows.zip(sums).zip(data.chunks(row_bytes as usize)) {
            let found = crc32c::crc32c(bytes);
            if found != expected {
                return Err(TierError::RowChecksum { key: key.to_string(), row, found, expected });
            }
        }
        Ok((data, true))
    }

    /// The crc32c of rows `rows` of object `key` (of `size` bytes, in rows of `row_bytes`) as
    /// written beside it; `None` if none were.
    async fn row_sums(
        &self,
        key: &str,
        size: u64,
        row_bytes: u64,
        rows: Range<u64>,
    ) -> Result<Option<Vec<u32>>, TierError> {
        let sums_key = rows::sums_key(key);
        let bad = |reason: String| TierError::RowSums { key: key.to_string(), reason };
        let head = match self.get_range(&sums_key, 0..rows::HEAD_BYTES).await {
            Ok(head) => head,
            Err(TierError::Missing { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        rows::decode_head(&head, row_bytes, size.div_ceil(row_bytes.max(1))).map_err(|e| bad(e.to_string()))?;
        let at = rows::HEAD_BYTES + 4 * rows.start;
        let got = self.get_range(&sums_key, at..at + 4 * (rows.end - rows.start)).await?;
        if got.len() as u64 != 4 * (rows.end - rows.start) {
            return Err(bad(format!("it ends before row {}'s", rows.end - 1)));
        }
        Ok(Some(rows::decode_sums(&got)))
    }

    /// Its size.
    pub async fn size(&self, key: &str) -> Result<u64, TierError> {
        self.store.head(&Path::from(key)).await.map(|m| m.size).map_err(|e| store_error(key, e))
    }

    /// Reads the whole object `key` and checks it has `size` bytes hashing to `blake3`, and
    /// that the row checksums beside it (rows of `row_bytes`), if it has them, are its rows'.
    pub async fn verify(&self, key: &str, size: u64, blake3: &[u8; 32], row_bytes: u64) -> Result<(), TierError> {
        let got = self.store.get(&Path::from(key)).await.map_err(|e| store_error(key, e))?;
        let mut stream = got.into_stream();
        let mut hasher = blake3::Hasher::new();
        let mut sums = rows::RowSums::new(row_bytes);
        let mut found = 0u64;
        while let Some(chunk) = stream.try_next().await.map_err(|e| store_error(key, e))? {
            found += chunk.len() as u64;
            hasher.update(&chunk);
            sums.update(&chunk);
        }
        if found != size {
            return Err(TierError::Size { key: key.to_string(), found, expected: size });
        }
        let hash = hasher.finalize();
        if hash.as_bytes() != blake3 {
            return Err(TierError::Checksum { key: key.to_string(), found: hash.to_hex().to_string() });
        }
        let rows = size.div_ceil(sums.row_bytes());
        if let Some(recorded) = self.row_sums(key, size, sums.row_bytes(), 0..rows).await? {
            let computed = sums.finish();
            if let Some(row) = (0..rows).find(|&r| computed[r as usize] != recorded[r as usize]) {
                let (found, expected) = (computed[row as usize], recorded[row as usize]);
                return Err(TierError::RowChecksum { key: rows::sums_key(key), row, found, expected });
            }
        }
        Ok(())
    }

    /// Every object under `files/`.
    pub async fn list(&self) -> Result<Vec<Listed>, TierError> {
        let prefix = Path::from("files");
        let metas: Vec<object_store::ObjectMeta> =
            self.store.list(Some(&prefix)).try_collect().await.map_err(|e| store_error("files/", e))?;
        Ok(metas
            .into_iter()
            .map(|m| Listed {
                key: m.location.to_string(),
                size: m.size,
                written_ms: m.last_modified.timestamp_millis().max(0) as u64,
            })
            .collect())
    }

    /// Removes what uploads interrupted by a crash left on a local tier (object_store stages
    /// an upload as `KEY#N` and renames it when complete; a killed process leaves it), once
    /// older than `grace_ms`. Answers how many and their bytes. Other tiers: nothing to do
    /// here (S3 keeps unfinished multipart uploads until a lifecycle rule aborts them).
    pub fn sweep_staged(&self, grace_ms: u64) -> (u64, u64) {
        fn walk(dir: &FsPath, grace: std::time::Duration, out: &mut (u64, u64)) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for e in entries.filter_map(Result::ok) {
                let path = e.path();
                let Ok(meta) = e.metadata() else { continue };
                if meta.is_dir() {
                    walk(&path, grace, out);
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                let staged =
                    name.split_once('#').is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                let old = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age >= grace);
                if staged && old && std::fs::remove_file(&path).is_ok() {
                    out.0 += 1;
                    out.1 += meta.len();
                }
            }
        }
        let mut swept = (0, 0);
        if let Some(root) = &self.root {
            walk(&root.join("files"), std::time::Duration::from_millis(grace_ms), &mut swept);
        }
        swept
    }

    /// Deletes object `key` and the row checksums beside it.
    pub async fn delete(&self, key: &str) -> Result<(), TierError> {
        for k in [key.to_string(), rows::sums_key(key)] {
            match self.store.delete(&Path::from(k.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(&k, e)),
            }
        }
        Ok(())
    }
}

/// An object being written (see [`Tier::writer`]). Dropped before `finish`, nothing is left
/// under its key.
pub struct ObjectWriter {
    key: String,
    store: Arc<dyn ObjectStore>,
    /// The rows' checksums, if asked for.
    rows: Option<rows::RowSums>,
    /// A local tier's directory: the object is synced to disk before `finish` answers.
    root: Option<std::path::PathBuf>,
    upload: WriteMultipart,
    hasher: blake3::Hasher,
    size: u64,
}

impl std::fmt::Debug for ObjectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectWriter({}, {} bytes)", self.key, self.size)
    }
}

impl ObjectWriter {
    /// Also writes the crc32c of each `row_bytes` beside the object (`KEY.rows`), so a row read
    /// alone can be checked (see [`Tier::get_rows`]).
    pub fn with_row_sums(mut self, row_bytes: u64) -> ObjectWriter {
        self.rows = Some(rows::RowSums::new(row_bytes));
        self
    }

    /// Appends `bytes` (waits while too many parts are on their way).
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), TierError> {
        self.hasher.update(&bytes);
        if let Some(sums) = &mut self.rows {
            sums.update(&bytes);
        }
        self.size += bytes.len() as u64;
        self.upload.wait_for_capacity(4).await.map_err(|e| store_error(&self.key, e))?;
        self.upload.put(bytes);
        Ok(())
    }

    /// Completes the object, durable (on a local tier: the file and the directories that name
    /// it synced, as object_store does not); answers its size and hash. A stub may name it then.
    pub async fn finish(self) -> Result<Written, TierError> {
        let ObjectWriter { key, store, rows, root, upload, hasher, size } = self;
        upload.finish().await.map_err(|e| store_error(&key, e))?;
        synced(root.as_deref(), &key).await?;
        let mut written = Written { size, blake3: *hasher.finalize().as_bytes(), rows: 0 };
        if let Some(sums) = rows {
            let row_bytes = sums.row_bytes();
            let sums = sums.finish();
            written.rows = sums.len() as u64;
            let sums_key = rows::sums_key(&key);
            let bytes = Bytes::from(rows::encode(row_bytes, &sums));
            store
                .put(&Path::from(sums_key.as_str()), PutPayload::from(bytes))
                .await
                .map_err(|e| store_error(&sums_key, e))?;
            synced(root.as_deref(), &sums_key).await?;
        }
        Ok(written)
    }
}

/// On a local tier (`root`), syncs object `key`'s file and the directories that name it, as
/// object_store does not. Elsewhere the store made it durable when it answered.
async fn synced(root: Option<&FsPath>, key: &str) -> Result<(), TierError> {
    let Some(root) = root else { return Ok(()) };
    let path = root.join(key);
    let synced = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::File::open(&path)?.sync_all()?;
        // The object's directory, and the one above it (made for this file's first object).
        let mut dir = path.parent();
        for _ in 0..2 {
            if let Some(d) = dir {
                std::fs::File::open(d)?.sync_all()?;
                dir = d.parent();
            }
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    synced.map_err(|e| TierError::Store {
        key: key.to_string(),
        source: object_store::Error::Generic { store: "local", source: Box::new(e) },
    })
}

/// The object `key` as one payload (small objects, tests).
pub fn payload(bytes: Bytes) -> PutPayload {
    PutPayload::from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("stripelock-tier-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn an_object_round_trips_with_its_hash_and_is_never_overwritten() {
        let dir = tmp("round");
        let tier = Tier::local(&dir).unwrap();
        let data: Vec<u8> = (0..(PART_BYTES * 2 + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        let key = Tier::key(7, 1);
        let parts: Vec<Bytes> = data.chunks(3 << 20).map(Bytes::copy_from_slice).collect();
        let w = tier.put(&key, parts).await.unwrap();
        assert_eq!(w.size, data.len() as u64);
        assert_eq!(&w.blake3, blake3::hash(&data).as_bytes());
        assert_eq!(tier.get_range(&key, 100..4196).await.unwrap(), data[100..4196]);
        assert_eq!(tier.size(&key).await.unwrap(), data.len() as u64);
        assert_eq!(w.rows, 0, "no row checksums were asked for");
        tier.verify(&key, w.size, &w.blake3, 1 << 20).await.unwrap();
        assert!(matches!(tier.verify(&key, w.size, &[0; 32], 1 << 20).await, Err(TierError::Checksum { .. })));
        assert!(matches!(tier.verify(&key, w.size + 1, &w.blake3, 1 << 20).await, Err(TierError::Size { .. })));
        assert!(tier.put(&key, [Bytes::from_static(b"x")]).await.is_err(), "a key is written once");
        let keys: Vec<String> = tier.list().await.unwrap().into_iter().map(|l| l.key).collect();
        assert_eq!(keys, [key.as_str()]);
        tier.delete(&key).await.unwrap();
        assert!(matches!(tier.get_range(&key, 0..1).await, Err(TierError::Missing { .. })));
        tier.delete(&key).await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_unfinished_write_leaves_no_object() {
        let dir = tmp("unfinished");
        let tier = Tier::local(&dir).unwrap();
        let key = Tier::key(8, 2);
        let mut w = tier.writer(&key).await.unwrap();
        w.write(Bytes::from(vec![1u8; PART_BYTES + 1])).await.unwrap();
        drop(w);
        assert!(tier.list().await.unwrap().is_empty());
        assert!(matches!(tier.size(&key).await, Err(TierError::Missing { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn rows_read_alone_are_checked_against_the_sums_written_beside_the_object() {
        let dir = tmp("rows");
        let tier = Tier::local(&dir).unwrap();
        let (row, size) = (1000u64, 5500u64);
        let data: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
        let key = Tier::key(9, 1);
        let mut w = tier.writer(&key).await.unwrap().with_row_sums(row);
        for piece in data.chunks(700) {
            w.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        let written = w.finish().await.unwrap();
        assert_eq!((written.size, written.rows), (size, 6));
        assert_eq!(
            tier.get_rows(&key, size, row, 2..4).await.unwrap(),
            (Bytes::copy_from_slice(&data[2000..4000]), true)
        );
        assert_eq!(tier.get_rows(&key, size, row, 5..6).await.unwrap().0, data[5000..]);
        tier.verify(&key, size, &written.blake3, row).await.unwrap();

        // A byte of row 3 damaged: a read of that row is refused, naming it; other rows read.
        let path = dir.join(&key);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3456] ^= 4;
        std::fs::write(&path, &bytes).unwrap();
        for rows in [3..4, 2..5] {
            match tier.get_rows(&key, size, row, rows).await {
                Err(e @ TierError::RowChecksum { row: 3, .. }) => {
                    assert!(e.to_string().contains("row 3 of the tier object"))
                }
                other => panic!("a damaged row was read: {other:?}"),
            }
        }
        assert!(tier.get_rows(&key, size, row, 4..6).await.is_ok());
        assert!(matches!(tier.verify(&key, size, &written.blake3, row).await, Err(TierError::Checksum { .. })));
        bytes[3456] ^= 4;
        std::fs::write(&path, &bytes).unwrap();
        // Sums of rows of another size, or too few of them, are refused.
        assert!(matches!(tier.get_rows(&key, size, 2000, 0..1).await, Err(TierError::RowSums { .. })));
        assert!(matches!(tier.get_rows(&key, size + 1000, row, 0..1).await, Err(TierError::RowSums { .. })));

        // Damaged sums: a scrub finds them though the object hashes right.
        let sums_path = dir.join(rows::sums_key(&key));
        let mut sums = std::fs::read(&sums_path).unwrap();
        sums[rows::HEAD_BYTES as usize + 4] ^= 1;
        std::fs::write(&sums_path, &sums).unwrap();
        match tier.verify(&key, size, &written.blake3, row).await {
            Err(TierError::RowChecksum { row: 1, .. }) => {}
            other => panic!("damaged row sums went unseen: {other:?}"),
        }
        // An object without sums (written by a build before them): rows checked for length only.
        std::fs::remove_file(&sums_path).unwrap();
        assert_eq!(
            tier.get_rows(&key, size, row, 1..2).await.unwrap(),
            (Bytes::copy_from_slice(&data[1000..2000]), false)
        );
        assert!(matches!(tier.get_rows(&key, size + 1, row, 5..6).await, Err(TierError::Size { .. })));
        tier.verify(&key, size, &written.blake3, row).await.unwrap();

        // A delete takes the sums with the object.
        std::fs::write(&sums_path, &sums).unwrap();
        tier.delete(&key).await.unwrap();
        assert!(tier.list().await.unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
