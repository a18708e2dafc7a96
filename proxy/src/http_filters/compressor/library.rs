//! The compressor libraries (`compressor_library`): gzip (zlib-ng), brotli
//! and zstd, each a streaming encoder that flushes at every chunk (zstd
//! only at the end, as Envoy's) and finishes at the end of the stream.

use crate::config::{join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use legate_proto::envoy_types::pb::envoy::extensions::compression::brotli::compressor::v3 as br;
use legate_proto::envoy_types::pb::envoy::extensions::compression::gzip::compressor::v3 as gz;
use legate_proto::envoy_types::pb::envoy::extensions::compression::zstd::compressor::v3 as zs;
use std::io::Write;

pub const GZIP: &str = "envoy.extensions.compression.gzip.compressor.v3.Gzip";
pub const BROTLI: &str = "envoy.extensions.compression.brotli.compressor.v3.Brotli";
pub const ZSTD: &str = "envoy.extensions.compression.zstd.compressor.v3.Zstd";

/// A library and its settings.
#[derive(Debug, Clone)]
pub enum Library {
    /// zlib's window and memory settings change the bytes (and the
    /// memory used), not what they decode to; flate2's gzip writer keeps
    /// its own.
    Gzip {
        level: u32,
    },
    Brotli {
        quality: u32,
        window_bits: u32,
        block_bits: u32,
        mode: u32,
        no_literal_context: bool,
    },
    Zstd {
        level: i32,
        checksum: bool,
    },
}

impl Library {
    pub fn from_proto(t: &TypedExtensionConfig, path: &str) -> Result<Library> {
        let tp = join(path, "typed_config");
        let any = t
            .typed_config
            .as_ref()
            .ok_or_else(|| ConfigError::new(&tp, "typed_config is required"))?;
        let decode_err = |e: prost::DecodeError| ConfigError::new(&tp, e.to_string());
        match legate_proto::type_name(&any.type_url) {
            GZIP => {
                let g: gz::Gzip =
                    prost::Message::decode(any.value.as_slice()).map_err(decode_err)?;
                // DEFAULT_COMPRESSION (0) is zlib's default, level 6; the
                // others are their level.
                let level = match g.compression_level {
                    1..=9 => g.compression_level as u32,
                    _ => 6,
                };
                Ok(Library::Gzip { level })
            }
            BROTLI => {
                let b: br::Brotli =
                    prost::Message::decode(any.value.as_slice()).map_err(decode_err)?;
                Ok(Library::Brotli {
                    quality: b.quality.as_ref().map_or(3, |q| q.value),
                    window_bits: b.window_bits.as_ref().map_or(18, |w| w.value),
                    block_bits: b.input_block_bits.as_ref().map_or(24, |w| w.value),
                    mode: b.encoder_mode as u32,
                    no_literal_context: b.disable_literal_context_modeling,
                })
            }
            ZSTD => {
                let z: zs::Zstd =
                    prost::Message::decode(any.value.as_slice()).map_err(decode_err)?;
                if z.dictionary.is_some() {
                    return Err(ConfigError::new(
                        join(&tp, "dictionary"),
                        "zstd dictionaries are not supported",
                    ));
                }
                Ok(Library::Zstd {
                    level: z.compression_level.as_ref().map_or(3, |l| l.value as i32),
                    checksum: z.enable_checksum,
                })
            }
            other => Err(ConfigError::new(
                &tp,
                format!("compressor library {other} is not supported"),
            )),
        }
    }

    /// The `content-encoding` it writes.
    pub fn encoding(&self) -> &'static str {
        match self {
            Library::Gzip { .. } => "gzip",
            Library::Brotli { .. } => "br",
            Library::Zstd { .. } => "zstd",
        }
    }

    /// Its stats prefix.
    pub fn stat_prefix(&self) -> &'static str {
        match self {
            Library::Gzip { .. } => "gzip.",
            Library::Brotli { .. } => "brotli.",
            Library::Zstd { .. } => "zstd.",
        }
    }

    pub fn encoder(&self) -> Encoder {
        match *self {
            Library::Gzip { level } => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level),
            )),
            Library::Brotli {
                quality,
                window_bits,
                block_bits,
                mode,
                no_literal_context,
            } => {
                use brotli::enc::backward_references::BrotliEncoderMode as M;
                let p = brotli::enc::BrotliEncoderParams {
                    quality: quality as i32,
                    lgwin: window_bits as i32,
                    lgblock: block_bits as i32,
                    // Envoy's DEFAULT and GENERIC are brotli's generic mode.
                    mode: match mode {
                        2 => M::BROTLI_MODE_TEXT,
                        3 => M::BROTLI_MODE_FONT,
                        _ => M::BROTLI_MODE_GENERIC,
                    },
                    disable_literal_context_modeling: i32::from(no_literal_context),
                    ..Default::default()
                };
                Encoder::Brotli(Box::new(brotli::CompressorWriter::with_params(
                    Vec::new(),
                    4096,
                    &p,
                )))
            }
            Library::Zstd { level, checksum } => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), level)
                    .expect("zstd encoder at a valid level");
                let _ = e.include_checksum(checksum);
                Encoder::Zstd(Some(e))
            }
        }
    }
}

/// One response's encoder.
pub enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(Option<zstd::stream::write::Encoder<'static, Vec<u8>>>),
}

impl Encoder {
    /// Compresses `input`; `end` finishes the stream. Returns what is
    /// ready to send.
    pub fn push(&mut self, input: &[u8], end: bool) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => {
                e.write_all(input)?;
                if end {
                    e.try_finish()?;
                } else {
                    e.flush()?;
                }
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Brotli(e) => {
                e.write_all(input)?;
                if end {
                    let w = std::mem::replace(
                        e,
                        Box::new(brotli::CompressorWriter::new(Vec::new(), 4096, 3, 18)),
                    );
                    return Ok(w.into_inner());
                }
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Zstd(slot) => {
                let Some(e) = slot.as_mut() else {
                    return Ok(Vec::new());
                };
                e.write_all(input)?;
                if end {
                    let e = slot.take().expect("present");
                    return e.finish();
                }
                Ok(std::mem::take(e.get_mut()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn roundtrip(lib: Library) -> Vec<u8> {
        let mut e = lib.encoder();
        let mut out = e.push(b"hello hello hello ", false).unwrap();
        out.extend(e.push(b"world", true).unwrap());
        let mut plain = Vec::new();
        match lib {
            Library::Gzip { .. } => {
                flate2::read::GzDecoder::new(&out[..])
                    .read_to_end(&mut plain)
                    .unwrap();
            }
            Library::Brotli { .. } => {
                brotli::Decompressor::new(&out[..], 4096)
                    .read_to_end(&mut plain)
                    .unwrap();
            }
            Library::Zstd { .. } => {
                plain = zstd::stream::decode_all(&out[..]).unwrap();
            }
        }
        plain
    }

    #[test]
    fn each_library_streams_what_decodes_back() {
        for lib in [
            Library::Gzip { level: 6 },
            Library::Brotli {
                quality: 3,
                window_bits: 18,
                block_bits: 24,
                mode: 0,
                no_literal_context: false,
            },
            Library::Zstd {
                level: 3,
                checksum: false,
            },
        ] {
            assert_eq!(roundtrip(lib), b"hello hello hello world");
        }
    }
}
