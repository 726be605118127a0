//! The shard's append-only log: what makes a change durable.
//!
//! Every change of a node's state is a *frame* in the log before it is
//! acknowledged (sync mode) or within the flush interval (async mode): a
//! group commit's own entries and idempotency records, a replica change set,
//! a restore, a drain step. One thread writes the log ([`crate::journal`]):
//! it gathers the frames of a group into one buffer, writes it with one
//! `write` and makes it durable with one `fdatasync`.
//!
//! # Format
//!
//! The log is a run of segment files `log/<first sequence, 20 digits>.log`:
//!
//! ```text
//! segment = header | frame*
//! header  = "TALLYLOG" | version: u32 LE (1) | 0: u32 | first_seq: u64 LE
//!           | chain: u32 LE | crc32 of the previous 28 bytes: u32 LE
//! frame   = length: u32 LE | crc: u32 LE | payload (length bytes)
//! payload = seq: u64 LE | kind: u8 | body
//! ```
//!
//! Sequence numbers count frames from 1, with no gap, across segments.
//! `crc` is a CRC-32 of the payload *started from the previous frame's crc*
//! (the segment header's `chain` for the first frame of a segment): each
//! frame vouches for the one before it. So a stale frame left behind a
//! failed write, whose predecessor was written again with other contents,
//! does not check out, and a frame cannot be moved or replayed elsewhere.
//!
//! # Recovery
//!
//! [`scan`] reads every segment, checks headers, sequence numbers and
//! checksums, and hands the frames after the checkpoint's position to the
//! caller in order. The first bad frame of the *last* segment ends the log:
//! a write torn by a crash, cut when the log is opened for writing. A bad
//! frame anywhere else, a gap, or a log that ends before the last frame the
//! node knew durable (the witness, see [`crate::storage`]) is damage: the
//! node refuses to start and changes nothing.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The log's directory inside a data directory.
pub const LOG_DIR: &str = "log";
const MAGIC: &[u8; 8] = b"TALLYLOG";
const VERSION: u32 = 1;
const SEGMENT_HEADER: usize = 32;
const FRAME_HEADER: usize = 8;
/// Bytes of a payload before the body: sequence and kind.
const PAYLOAD_HEADER: usize = 9;
/// A write buffer larger than this is not kept for the next group.
const KEPT_BUFFER_BYTES: usize = 4 << 20;
/// Largest frame accepted on reading: a full replica copy of millions of
/// entries fits; a damaged length field asking for more is a bad frame.
const MAX_FRAME: usize = 1 << 30;

/// What a frame records (its body's layout is in [`crate::journal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A group commit of own entries and idempotency records.
    Own = 1,
    /// A replica change set (or full copy) of another node's entries.
    Replica = 2,
    /// Counters removed from every replica copy (a delete).
    EraseCopies = 3,
    /// Own entries set outside the increment path: a restore, an adoption.
    SetOwn = 4,
    /// A drain step of this node.
    Drain = 5,
    /// A drained node's copy dropped, and the node retired.
    DropCopy = 6,
    /// A start of the node: its incarnation.
    Start = 7,
    /// The data directory's creation: the first frame of its log.
    Created = 8,
    /// A takeover of another node's keyed increments began, closed or ended.
    StandIn = 9,
    /// The membership the node takes keyed increments of, sealed or open.
    KeyedRing = 10,
}

impl FrameKind {
    /// The kind of a frame's kind byte.
    pub fn from_byte(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            1 => FrameKind::Own,
            2 => FrameKind::Replica,
            3 => FrameKind::EraseCopies,
            4 => FrameKind::SetOwn,
            5 => FrameKind::Drain,
            6 => FrameKind::DropCopy,
            7 => FrameKind::Start,
            8 => FrameKind::Created,
            9 => FrameKind::StandIn,
            10 => FrameKind::KeyedRing,
            _ => return None,
        })
    }
}

/// One frame read back.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// Its sequence number.
    pub seq: u64,
    /// What it records.
    pub kind: FrameKind,
    /// Its body.
    pub body: &'a [u8],
}

/// Why a log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log is damaged: what is wrong.
    #[error("{0}")]
    Damaged(String),
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn segment_header(first_seq: u64, chain: u32) -> [u8; SEGMENT_HEADER] {
    let mut header = [0; SEGMENT_HEADER];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&first_seq.to_le_bytes());
    header[24..28].copy_from_slice(&chain.to_le_bytes());
    let crc = crc32fast::hash(&header[..28]);
    header[28..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// `(first_seq, chain)` of a segment header, if it is one.
fn parse_segment_header(bytes: &[u8]) -> Option<(u64, u32)> {
    let header = bytes.get(..SEGMENT_HEADER)?;
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    if &header[..8] != MAGIC || word(8) != VERSION || crc32fast::hash(&header[..28]) != word(28) {
        return None;
    }
    let first_seq = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    Some((first_seq, word(24)))
}

fn frame_crc(chain: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(chain);
    hasher.update(payload);
    hasher.finalize()
}

/// The segments of a log directory, oldest first: `(first_seq, path)`.
/// Files that are not segments are left alone and not listed.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(first_seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            segments.push((first_seq, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

/// Where the log ends, as [`scan`] found it: what [`LogWriter::open`]
/// continues from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogEnd {
    /// `(first_seq, length of its valid part)` of every segment, oldest first.
    pub segments: Vec<(u64, u64)>,
    /// The last whole frame's sequence number (0: none ever).
    pub last_seq: u64,
    /// Its crc: the chain the next frame continues.
    pub chain: u32,
    /// Bytes after the last whole frame (a torn write), to be cut.
    pub torn_bytes: u64,
    /// Frames read (after the checkpoint's position and before).
    pub frames: u64,
    /// Bytes of the segments.
    pub bytes: u64,
}

/// A `position` for [`scan`] that is not known yet: the log is checked
/// through, nothing is replayed, and its start is not compared with a
/// checkpoint.
pub const UNKNOWN_POSITION: u64 = u64::MAX;

/// Reads and checks the log in `dir` (the log directory), and calls
/// `replay` with every frame after `position` (the checkpoint's), in order.
/// `witnessed` is the last frame the node knew durable: a log that ends
/// before it lost acknowledged writes. Changes nothing on disk.
pub fn scan(
    dir: &Path,
    position: u64,
    witnessed: u64,
    mut replay: impl FnMut(Frame<'_>) -> Result<(), String>,
) -> Result<LogEnd, LogError> {
    let damaged = |message: String| LogError::Damaged(message);
    let segments = list_segments(dir)?;
    if segments.is_empty() {
        return Err(damaged(format!(
            "the log ({}) has no segment",
            dir.display()
        )));
    }
    let mut end = LogEnd::default();
    // Where the log was cut short, to name it if frames are missing.
    let mut cut_at = None;
    let count = segments.len();
    for (index, (named_first, path)) in segments.iter().enumerate() {
        let last_segment = index + 1 == count;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let bytes = std::fs::read(path)?;
        end.bytes += bytes.len() as u64;
        let Some((first_seq, chain)) = parse_segment_header(&bytes) else {
            if last_segment && index > 0 {
                // A crash while the segment was being created.
                end.segments.push((*named_first, 0));
                end.torn_bytes += bytes.len() as u64;
                continue;
            }
            return Err(damaged(format!("log segment {name} has no valid header")));
        };
        if first_seq != *named_first {
            return Err(damaged(format!(
                "log segment {name} says it starts at frame {first_seq}"
            )));
        }
        if first_seq == 0 {
            // Frames count from 1: a header of frame 0 was never written by
            // the log, and would make the frame before it `u64::MAX`.
            return Err(damaged(format!(
                "log segment {name} says it starts at frame 0"
            )));
        }
        if index == 0 {
            if position != UNKNOWN_POSITION && first_seq > position + 1 {
                return Err(damaged(format!(
                    "the log starts at frame {first_seq}, but the checkpoint covers only up to \
                     frame {position}: frames {} to {} are missing",
                    position + 1,
                    first_seq - 1
                )));
            }
            end.last_seq = first_seq - 1;
            end.chain = chain;
        } else if first_seq != end.last_seq + 1 || chain != end.chain {
            return Err(damaged(format!(
                "log segment {name} does not continue the one before it (frame {} expected)",
                end.last_seq + 1
            )));
        }
        let mut at = SEGMENT_HEADER;
        loop {
            let rest = &bytes[at..];
            if rest.is_empty() {
                break;
            }
            let frame = (|| {
                let header = rest.get(..FRAME_HEADER)?;
                let length = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
                let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
                if !(PAYLOAD_HEADER..=MAX_FRAME).contains(&length) {
                    return None;
                }
                let payload = rest.get(FRAME_HEADER..FRAME_HEADER + length)?;
                if frame_crc(end.chain, payload) != crc {
                    return None;
                }
                let seq = u64::from_le_bytes(payload[..8].try_into().ok()?);
                // No frame is numbered `u64::MAX`: so `last_seq + 1` never
                // overflows, here or in the writer that continues the log.
                if seq != end.last_seq + 1 || seq == u64::MAX {
                    return None;
                }
                let kind = FrameKind::from_byte(payload[8])?;
                Some((
                    crc,
                    length,
                    Frame {
                        seq,
                        kind,
                        body: &payload[PAYLOAD_HEADER..],
                    },
                ))
            })();
            let Some((crc, length, frame)) = frame else {
                if !last_segment {
                    return Err(damaged(format!(
                        "log segment {name} has a bad frame at byte {at}, before the end of the log"
                    )));
                }
                end.torn_bytes += rest.len() as u64;
                cut_at = Some(format!("log segment {name} has a bad frame at byte {at}"));
                break;
            };
            if frame.seq > position {
                replay(frame).map_err(|problem| {
                    damaged(format!(
                        "frame {} of log segment {name}: {problem}",
                        frame.seq
                    ))
                })?;
            }
            end.frames += 1;
            end.last_seq = frame.seq;
            end.chain = crc;
            at += FRAME_HEADER + length;
        }
        end.segments.push((first_seq, at as u64));
    }
    if end.last_seq < witnessed {
        return Err(damaged(format!(
            "{}the log ends at frame {}, but frame {witnessed} was durable: acknowledged writes \
             are missing",
            cut_at.map(|cut| format!("{cut}: ")).unwrap_or_default(),
            end.last_seq
        )));
    }
    if position != UNKNOWN_POSITION && end.last_seq < position {
        return Err(damaged(format!(
            "the log ends at frame {}, before the checkpoint's position {position}",
            end.last_seq
        )));
    }
    Ok(end)
}

/// Creates an empty log (one segment starting at frame 1) in `dir`, which
/// must not hold one. Durable when it returns.
pub fn create(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    create_segment(dir, 1, 0)?;
    Ok(())
}

/// Creates segment `first_seq` with its header, durably (file and
/// directory).
fn create_segment(dir: &Path, first_seq: u64, chain: u32) -> std::io::Result<File> {
    let path = dir.join(segment_name(first_seq));
    let created = (|| {
        let mut file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all(&segment_header(first_seq, chain))?;
        file.sync_data()?;
        File::open(dir)?.sync_all()?;
        Ok(file)
    })();
    if created.is_err() {
        // A half-made segment would be read as a torn one; better gone.
        let _ = std::fs::remove_file(&path);
    }
    created
}

/// The one writer of a log: frames are added to a pending group with
/// [`LogWriter::append`] and made durable together by
/// [`LogWriter::commit`].
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    file: File,
    /// Segments on disk, oldest first: `(first_seq, bytes)`; the last is
    /// the one written.
    segments: Vec<(u64, u64)>,
    /// The last durable frame and its crc.
    last_seq: u64,
    chain: u32,
    /// A new segment starts once the current one holds this many bytes.
    segment_bytes: u64,
    /// Frames appended since the last commit, and where they would leave
    /// the sequence and the chain.
    pending: Vec<u8>,
    pending_last_seq: u64,
    pending_chain: u32,
    /// A failed write may have left bytes after the last durable frame,
    /// and cutting them did not succeed or is not known durable: done
    /// before anything else is written (a new segment must not start
    /// behind a segment with a stale tail, which a start would read as
    /// damage).
    tail_to_cut: bool,
    /// Bytes of frames written since the writer opened.
    appended: u64,
}

impl LogWriter {
    /// Opens the log `scan` found for writing after its last whole frame,
    /// cutting a torn tail.
    pub fn open(dir: &Path, end: &LogEnd, segment_bytes: u64) -> std::io::Result<LogWriter> {
        let mut segments = end.segments.clone();
        // A segment whose header never made it is dropped (it has no frame).
        while let [.., (first_seq, 0)] = segments[..] {
            if segments.len() == 1 {
                break;
            }
            std::fs::remove_file(dir.join(segment_name(first_seq)))?;
            segments.pop();
        }
        // `scan` records a zero length only for a torn header after the
        // first segment, dropped above.
        let &(first_seq, length) = segments.last().expect("a log has a segment");
        let file = File::options()
            .read(true)
            .write(true)
            .open(dir.join(segment_name(first_seq)))?;
        if file.metadata()?.len() != length {
            file.set_len(length)?;
            file.sync_all()?;
        }
        Ok(LogWriter {
            dir: dir.to_path_buf(),
            file,
            segments,
            last_seq: end.last_seq,
            chain: end.chain,
            segment_bytes,
            pending: Vec::new(),
            pending_last_seq: end.last_seq,
            pending_chain: end.chain,
            tail_to_cut: false,
            appended: 0,
        })
    }

    /// Adds a frame to the pending group; `body` writes its body. Returns
    /// its sequence number.
    pub fn append(&mut self, kind: FrameKind, body: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let seq = self.pending_last_seq + 1;
        let start = self.pending.len();
        self.pending.extend_from_slice(&[0; FRAME_HEADER]);
        self.pending.extend_from_slice(&seq.to_le_bytes());
        self.pending.push(kind as u8);
        body(&mut self.pending);
        let payload = &self.pending[start + FRAME_HEADER..];
        let length = u32::try_from(payload.len()).expect("a frame is smaller than 4 GiB");
        let crc = frame_crc(self.pending_chain, payload);
        self.pending[start..start + 4].copy_from_slice(&length.to_le_bytes());
        self.pending[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        self.pending_last_seq = seq;
        self.pending_chain = crc;
        seq
    }

    /// Writes the pending frames with one write and makes them durable
    /// with one fdatasync (after starting a new segment if the current one
    /// is full). On failure nothing of the group counts: the file is cut
    /// back to the last durable frame and the pending frames are dropped.
    pub fn commit(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.cut_tail().and_then(|()| self.write_pending());
        if result.is_ok() {
            self.last_seq = self.pending_last_seq;
            self.chain = self.pending_chain;
            self.appended += self.pending.len() as u64;
        } else {
            self.tail_to_cut = true;
            // Now if it can be; else before the next write.
            let _ = self.cut_tail();
            self.pending_last_seq = self.last_seq;
            self.pending_chain = self.chain;
        }
        self.pending.clear();
        if self.pending.capacity() > KEPT_BUFFER_BYTES {
            // A large frame (a full replica copy) passed: its buffer goes.
            self.pending = Vec::new();
        }
        result
    }

    /// Cuts what a failed write left after the last durable frame, durably.
    fn cut_tail(&mut self) -> std::io::Result<()> {
        if self.tail_to_cut {
            let durable = self.segments.last().expect("a segment").1;
            self.file.set_len(durable)?;
            self.file.sync_data()?;
            self.tail_to_cut = false;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> std::io::Result<()> {
        let (_, length) = *self.segments.last().expect("a segment");
        if length >= self.segment_bytes && length > SEGMENT_HEADER as u64 {
            let first_seq = self.last_seq + 1;
            self.file = create_segment(&self.dir, first_seq, self.chain)?;
            self.segments.push((first_seq, SEGMENT_HEADER as u64));
        }
        let (_, length) = *self.segments.last().expect("a segment");
        self.file.write_all_at(&self.pending, length)?;
        self.file.sync_data()?;
        self.segments.last_mut().expect("a segment").1 += self.pending.len() as u64;
        Ok(())
    }

    /// The last durable frame's sequence number.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Bytes of frames written since the writer opened.
    pub fn appended_bytes(&self) -> u64 {
        self.appended
    }

    /// Bytes of log on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|(_, bytes)| bytes).sum()
    }

    /// Segments on disk.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Deletes the segments whose every frame is at or before `position`
    /// (a durable checkpoint covers them), oldest first, never the one
    /// being written. Returns how many were deleted.
    pub fn drop_through(&mut self, position: u64) -> std::io::Result<usize> {
        let mut dropped = 0;
        while self.segments.len() > 1 && self.segments[1].0 <= position + 1 {
            let (first_seq, _) = self.segments[0];
            std::fs::remove_file(self.dir.join(segment_name(first_seq)))?;
            crate::crash_point::reached("segment-deleted");
            self.segments.remove(0);
            dropped += 1;
        }
        if dropped > 0 {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(seq, body)` of frames read back.
    type Bodies = Vec<(u64, Vec<u8>)>;

    fn frames(dir: &Path, position: u64, witnessed: u64) -> Result<(Bodies, LogEnd), LogError> {
        let mut seen = Vec::new();
        let end = scan(dir, position, witnessed, |frame| {
            assert_eq!(frame.kind, FrameKind::Own);
            seen.push((frame.seq, frame.body.to_vec()));
            Ok(())
        })?;
        Ok((seen, end))
    }

    fn writer(dir: &Path, segment_bytes: u64) -> LogWriter {
        let (_, end) = frames(dir, 0, 0).unwrap();
        LogWriter::open(dir, &end, segment_bytes).unwrap()
    }

    fn write(log: &mut LogWriter, bodies: &[&[u8]]) {
        for body in bodies {
            log.append(FrameKind::Own, |buffer| buffer.extend_from_slice(body));
        }
        log.commit().unwrap();
    }

    #[test]
    fn frames_come_back_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path()).unwrap();
        let mut log = writer(dir.path(), 100);
        for round in 0..20u8 {
            write(&mut log, &[&[round; 30], &[round, 1]]);
        }
        assert!(log.segment_count() > 5, "{}", log.segment_count());
        drop(log);
        let (seen, end) = frames(dir.path(), 0, 40).unwrap();
        assert_eq!(seen.len(), 40);
        assert_eq!(end.last_seq, 40);
        assert_eq!(seen[2], (3, vec![1; 30]));
        // After a checkpoint at 25 only later frames are replayed.
        let (seen, _) = frames(dir.path(), 25, 40).unwrap();
        assert_eq!(seen.first().unwrap().0, 26);
        // Reopened, the log continues where it ended.
        let mut log = writer(dir.path(), 100);
        write(&mut log, &[b"more"]);
        let (seen, _) = frames(dir.path(), 40, 41).unwrap();
        assert_eq!(seen, vec![(41, b"more".to_vec())]);
    }

    #[test]
    fn segments_covered_by_a_checkpoint_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path()).unwrap();
        let mut log = writer(dir.path(), 64);
        for round in 0..10u8 {
            write(&mut log, &[&[round; 60]]);
        }
        let before = log.segment_count();
        let dropped = log.drop_through(5).unwrap();
        assert!(dropped > 0 && dropped < before);
        drop(log);
        let (seen, _) = frames(dir.path(), 5, 10).unwrap();
        assert_eq!(
            seen.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            (6..=10).collect::<Vec<_>>()
        );
        // A checkpoint that covers less than the log now starts is a gap.
        let error = frames(dir.path(), 0, 10).unwrap_err();
        assert!(error.to_string().contains("are missing"), "{error}");
    }

    /// Cuts `bytes` off the end of the last segment, as a crash in the
    /// middle of a write leaves it.
    fn cut_last_segment(dir: &Path, bytes: u64) {
        let path = last_segment(dir);
        let length = std::fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(length - bytes)
            .unwrap();
    }

    fn last_segment(dir: &Path) -> PathBuf {
        list_segments(dir).unwrap().pop().unwrap().1
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path()).unwrap();
        let mut log = writer(dir.path(), 1 << 20);
        write(&mut log, &[b"one", b"two"]);
        write(&mut log, &[b"three"]);
        drop(log);
        // A crash in the middle of the last write.
        cut_last_segment(dir.path(), 3);
        let (seen, end) = frames(dir.path(), 0, 2).unwrap();
        assert_eq!(seen.len(), 2);
        assert!(end.torn_bytes > 0);
        let mut log = LogWriter::open(dir.path(), &end, 1 << 20).unwrap();
        write(&mut log, &[b"four"]);
        let (seen, end) = frames(dir.path(), 0, 3).unwrap();
        assert_eq!(seen.last().unwrap(), &(3, b"four".to_vec()));
        assert_eq!(end.torn_bytes, 0);
    }

    #[test]
    fn a_lost_acknowledged_frame_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path()).unwrap();
        let mut log = writer(dir.path(), 1 << 20);
        write(&mut log, &[b"one", b"two", b"three"]);
        drop(log);
        cut_last_segment(dir.path(), 3);
        let error = frames(dir.path(), 0, 3).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("acknowledged writes are missing"),
            "{error}"
        );
    }

    #[test]
    fn a_bad_frame_before_the_last_segment_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path()).unwrap();
        let mut log = writer(dir.path(), 64);
        for round in 0..6u8 {
            write(&mut log, &[&[round; 60]]);
        }
        drop(log);
        let first = list_segments(dir.path()).unwrap()[0].1.clone();
        let mut bytes = std::fs::read(&first).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 0xff;
        std::fs::write(&first, bytes).unwrap();
        // Even with no witness to compare with.
        let error = frames(dir.path(), 0, 0).unwrap_err();
        assert!(error.to_string().contains("bad frame"), "{error}");
    }

    #[test]
    fn a_stale_frame_behind_a_failed_write_does_not_check_out() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path()).unwrap();
        let mut log = writer(dir.path(), 1 << 20);
        write(&mut log, &[b"one"]);
        let durable = std::fs::metadata(last_segment(dir.path())).unwrap().len();
        // A group written (A, B) whose write "failed": it stays on disk.
        write(&mut log, &[b"AAAA", b"BBBB"]);
        drop(log);
        let path = last_segment(dir.path());
        let stale = std::fs::read(&path).unwrap();
        // The retry writes another frame 2 of the same length over A.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(durable)
            .unwrap();
        let (_, end) = frames(dir.path(), 0, 1).unwrap();
        let mut log = LogWriter::open(dir.path(), &end, 1 << 20).unwrap();
        write(&mut log, &[b"CCCC"]);
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&stale[bytes.len()..]);
        std::fs::write(&path, bytes).unwrap();
        // B follows C on disk with the right sequence number, but not C's
        // chain: the log ends at C.
        let (seen, end) = frames(dir.path(), 0, 2).unwrap();
        assert_eq!(seen.last().unwrap(), &(2, b"CCCC".to_vec()));
        assert!(end.torn_bytes > 0);
    }

    #[test]
    fn a_segment_torn_at_creation_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path()).unwrap();
        let mut log = writer(dir.path(), 1 << 20);
        write(&mut log, &[b"one"]);
        drop(log);
        std::fs::write(dir.path().join(segment_name(2)), b"TALLY").unwrap();
        let (seen, end) = frames(dir.path(), 0, 1).unwrap();
        assert_eq!(seen.len(), 1);
        let mut log = LogWriter::open(dir.path(), &end, 1 << 20).unwrap();
        write(&mut log, &[b"two"]);
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
        let (seen, _) = frames(dir.path(), 0, 2).unwrap();
        assert_eq!(seen.len(), 2);
    }
}
