//! Streaming reader and writer for uint8 frame arrays in numpy's `.npy`
//! format (N, H, W, 3), so `wmvae encode` holds one chunk of frames in
//! memory, not the file; an `.npz` writer that streams one array at a
//! time (`encode`'s latents, `buffer export`, `series`); and a reader of one
//! float32 array from an `.npz` (`decode`'s latents), its size checked
//! against the file before anything is allocated. Files and headers only.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"\x93NUMPY";
/// Headers longer than this are not numpy's (it pads to 64 bytes; 4 KiB is generous).
const MAX_HEADER_BYTES: usize = 4096;

/// An open `.npy` of uint8 frames, positioned at the first frame.
pub struct FrameReader {
    path: PathBuf,
    reader: BufReader<File>,
    /// Frames not yet read.
    remaining: usize,
    pub count: usize,
    pub height: usize,
    pub width: usize,
}

fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}':"))? + key.len() + 3;
    Some(header[start..].trim_start())
}

/// The element types read here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    U8,
    F32,
}

impl Dtype {
    /// Whether numpy's `descr` (quoted, as in the header) names this type.
    fn is(self, descr: &str) -> bool {
        let names: &[&str] = match self {
            Dtype::U8 => &["'|u1'", "'u1'", "'<u1'"],
            Dtype::F32 => &["'<f4'", "'f4'"],
        };
        names.iter().any(|n| descr.starts_with(n))
    }
}

/// Parses `{'descr': '|u1', 'fortran_order': False, 'shape': (N, H, W, 3), }`
/// for an array of `dtype`.
fn parse_header(header: &str, dtype: Dtype) -> Result<Vec<usize>> {
    let descr = header_value(header, "descr").context("header has no 'descr'")?;
    if !dtype.is(descr) {
        let found = descr.split(',').next().unwrap_or(descr);
        let wanted = match dtype {
            Dtype::U8 => "frames must be uint8",
            Dtype::F32 => "latents must be float32",
        };
        bail!("dtype {found} unsupported: {wanted}");
    }
    let fortran = header_value(header, "fortran_order").context("header has no 'fortran_order'")?;
    if !fortran.starts_with("False") {
        bail!("Fortran-ordered arrays unsupported: save with np.ascontiguousarray");
    }
    let shape = header_value(header, "shape").context("header has no 'shape'")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .context("malformed 'shape'")?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .with_context(|| format!("malformed dimension {s:?} in 'shape'"))
        })
        .collect()
}

/// Reads a `.npy` header for an array of `dtype`: its shape and the offset of its data.
fn read_header(reader: &mut impl Read, dtype: Dtype) -> Result<(Vec<usize>, usize)> {
    let mut magic = [0u8; 8];
    reader
        .read_exact(&mut magic)
        .context("file too short for a .npy header")?;
    if &magic[..6] != MAGIC {
        bail!("missing the \\x93NUMPY magic");
    }
    let (len, prefix) = match magic[6] {
        1 => {
            let mut b = [0u8; 2];
            reader.read_exact(&mut b)?;
            (u16::from_le_bytes(b) as usize, 10)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            reader.read_exact(&mut b)?;
            (u32::from_le_bytes(b) as usize, 12)
        }
        v => bail!("unknown .npy format version {v}"),
    };
    if len > MAX_HEADER_BYTES {
        bail!("header of {len} bytes is too long");
    }
    let mut header = vec![0u8; len];
    reader.read_exact(&mut header).context("truncated header")?;
    let header = String::from_utf8(header).context("header is not text")?;
    Ok((parse_header(&header, dtype)?, prefix + len))
}

impl FrameReader {
    /// Opens `path` and checks it holds uint8 (N, H, W, 3) in C order.
    pub fn open(path: &Path) -> Result<FrameReader> {
        let with_path = |e: anyhow::Error| e.context(format!("{}: not a uint8 (N, H, W, 3) .npy", path.display()));
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let file_len = file.metadata()?.len() as usize;
        let mut reader = BufReader::new(file);
        let (shape, data_offset) = read_header(&mut reader, Dtype::U8).map_err(with_path)?;
        let [count, height, width, 3] = shape[..] else {
            return Err(with_path(anyhow::anyhow!("shape {shape:?} is not (N, H, W, 3)")));
        };
        let needed = count
            .checked_mul(height * width * 3)
            .context("shape overflows")
            .map_err(with_path)?;
        if file_len < data_offset + needed {
            return Err(with_path(anyhow::anyhow!(
                "truncated: shape {shape:?} needs {needed} bytes of data, the file has {}",
                file_len.saturating_sub(data_offset)
            )));
        }
        Ok(FrameReader {
            path: path.to_owned(),
            reader,
            remaining: count,
            count,
            height,
            width,
        })
    }

    /// Bytes of one frame.
    pub fn frame_bytes(&self) -> usize {
        self.height * self.width * 3
    }

    /// Reads up to `max_frames` frames preprocessed for the VAE (64x64 as
    /// they are, CarRacing's 96x96 cropped and resized: `preprocess`); an
    /// empty vector at the end.
    pub fn read_preprocessed(&mut self, max_frames: usize) -> Result<Vec<u8>> {
        let first = self.count - self.remaining;
        let chunk = self.read_chunk(max_frames)?;
        let mut frames = Vec::with_capacity(chunk.len() / self.frame_bytes() * crate::frames::BYTES);
        for (i, frame) in chunk.chunks_exact(self.frame_bytes()).enumerate() {
            let pixels = super::preprocess::preprocess(
                bytes::Bytes::copy_from_slice(frame),
                self.height,
                self.width,
                super::preprocess::Policy::WorldModels,
            )
            .with_context(|| format!("{}: frame {}", self.path.display(), first + i))?;
            frames.extend_from_slice(&pixels);
        }
        Ok(frames)
    }

    /// Reads up to `max_frames` frames as stored; an empty vector at the end.
    pub fn read_chunk(&mut self, max_frames: usize) -> Result<Vec<u8>> {
        let n = max_frames.min(self.remaining);
        let mut buf = vec![0u8; n * self.frame_bytes()];
        self.reader
            .read_exact(&mut buf)
            .with_context(|| format!("{}: truncated frame data", self.path.display()))?;
        self.remaining -= n;
        Ok(buf)
    }
}

/// A version 1.0 `.npy` header for a C-ordered array of numpy dtype `descr`
/// (`|u1`, `<f4`, `<U12`, ...) and `shape`.
pub fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that magic + version + length + header + '\n' is a multiple of 64.
    let padding = (64 - (10 + dict.len() + 1) % 64) % 64;
    let text = format!("{dict}{}\n", " ".repeat(padding));
    let mut out = MAGIC.to_vec();
    out.extend([1, 0]);
    out.extend((text.len() as u16).to_le_bytes());
    out.extend(text.as_bytes());
    out
}

/// `text` as numpy's `<U{width}` (UTF-32LE, NUL-padded to `width` characters).
pub fn utf32(text: &str, width: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(width * 4);
    for c in text.chars() {
        out.extend((c as u32).to_le_bytes());
    }
    out.resize(width * 4, 0);
    out
}

/// An `.npz` (a zip of `.npy` files, stored uncompressed) written one array
/// at a time, so a caller streams each array's data without holding it.
pub struct NpzWriter {
    zip: zip::ZipWriter<BufWriter<File>>,
    path: PathBuf,
}

impl NpzWriter {
    pub fn create(path: &Path) -> Result<NpzWriter> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(NpzWriter {
            zip: zip::ZipWriter::new(BufWriter::new(file)),
            path: path.to_path_buf(),
        })
    }

    /// Starts array `name` of numpy dtype `descr` and `shape`; its data
    /// (C order, little-endian) is then written to the returned writer.
    pub fn array(&mut self, name: &str, descr: &str, shape: &[usize]) -> Result<&mut impl Write> {
        let options = zip::write::FileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        self.zip
            .start_file(format!("{name}.npy"), options)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.zip.write_all(&header(descr, shape))?;
        Ok(&mut self.zip)
    }

    pub fn finish(mut self) -> Result<()> {
        self.zip
            .finish()
            .with_context(|| format!("finishing {}", self.path.display()))?
            .flush()?;
        Ok(())
    }
}

/// The most numbers [`read_npz_f32`] reads from one array: 64 Mi floats
/// (256 MB), far past any file of latents (a million latents of 32).
const MAX_NPZ_VALUES: usize = 64 << 20;

/// Array `key` of the `.npz` at `path`, which must be float32 in C order:
/// its shape and values. The shape's size is checked against the archive
/// entry's before anything is allocated.
pub fn read_npz_f32(path: &Path, key: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let what = || format!("{}: array {key:?}", path.display());
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .with_context(|| format!("{}: not an .npz (zip) file", path.display()))?;
    let mut entry = zip.by_name(&format!("{key}.npy")).with_context(what)?;
    let entry_size = usize::try_from(entry.size()).with_context(what)?;
    let (shape, data_offset) = read_header(&mut entry, Dtype::F32).with_context(what)?;
    let count = shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d))
        .filter(|n| *n <= MAX_NPZ_VALUES)
        .with_context(|| format!("{}: shape {shape:?} is over {MAX_NPZ_VALUES} values", what()))?;
    if entry_size != data_offset + count * 4 {
        bail!(
            "{}: shape {shape:?} needs {} bytes of data, the file has {}",
            what(),
            count * 4,
            entry_size.saturating_sub(data_offset)
        );
    }
    let mut bytes = vec![0u8; count * 4];
    entry.read_exact(&mut bytes).with_context(what)?;
    Ok((
        shape,
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    ))
}

/// Writes uint8 frames (N, H, W, 3) as a `.npy`.
pub fn write_frames(path: &Path, frames: &[u8], height: usize, width: usize) -> Result<()> {
    let frame_bytes = height * width * 3;
    if frame_bytes == 0 || frames.len() % frame_bytes != 0 {
        bail!("{} bytes are not whole {height}x{width}x3 frames", frames.len());
    }
    let mut out = BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    out.write_all(&header("|u1", &[frames.len() / frame_bytes, height, width, 3]))?;
    out.write_all(frames)?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.npy");
        let frames: Vec<u8> = (0..5 * 4 * 2 * 3).map(|i| i as u8).collect();
        write_frames(&path, &frames, 4, 2).unwrap();
        let mut r = FrameReader::open(&path).unwrap();
        assert_eq!((r.count, r.height, r.width), (5, 4, 2));
        let mut all = r.read_chunk(2).unwrap();
        all.extend(r.read_chunk(2).unwrap());
        all.extend(r.read_chunk(2).unwrap());
        assert!(r.read_chunk(2).unwrap().is_empty());
        assert_eq!(all, frames);
    }

    #[test]
    fn float_arrays_round_trip_through_npz_and_lies_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.npz");
        let values: Vec<f32> = (0..6).map(|i| i as f32 / 2.0).collect();
        let mut npz = NpzWriter::create(&path).unwrap();
        npz.array("z", "<f4", &[2, 3])
            .unwrap()
            .write_all(&values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
            .unwrap();
        npz.array("frames", "|u1", &[2]).unwrap().write_all(&[1, 2]).unwrap();
        npz.finish().unwrap();
        assert_eq!(read_npz_f32(&path, "z").unwrap(), (vec![2, 3], values));
        assert!(format!("{:#}", read_npz_f32(&path, "frames").unwrap_err()).contains("float32"));
        assert!(read_npz_f32(&path, "missing").is_err());
        // A header claiming a huge shape is refused before any allocation.
        let mut npz = NpzWriter::create(&path).unwrap();
        npz.array("z", "<f4", &[1 << 40, 32])
            .unwrap()
            .write_all(&[0u8; 16])
            .unwrap();
        npz.finish().unwrap();
        assert!(format!("{:#}", read_npz_f32(&path, "z").unwrap_err()).contains("over"));
    }

    #[test]
    fn bad_files_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.npy");
        std::fs::write(&path, b"hello").unwrap();
        let err = format!("{:#}", FrameReader::open(&path).err().unwrap());
        assert!(err.contains("bad.npy") && err.contains("too short"), "{err}");

        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 64, 64, 3), }\n";
        let mut bytes = MAGIC.to_vec();
        bytes.extend([1, 0]);
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = format!("{:#}", FrameReader::open(&path).err().unwrap());
        assert!(err.contains("'<f4'") && err.contains("uint8"), "{err}");

        write_frames(&path, &[0u8; 2 * 64 * 64 * 3], 64, 64).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 100).unwrap();
        let err = format!("{:#}", FrameReader::open(&path).err().unwrap());
        assert!(err.contains("truncated"), "{err}");
    }
}
