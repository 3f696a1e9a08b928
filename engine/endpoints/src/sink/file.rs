//! The `file` endpoint: newline-delimited JSON (one record object per line, as the consumer
//! API shows it) in `<dir>/<endpoint>.<n>.ndjson`, `n` counting up from 1. A batch goes to the
//! current file and is synced before it counts as delivered; when the current file would grow
//! past `max_bytes`, the next number starts, and the oldest files beyond `max_files` are
//! deleted. A write that fails is cut back off the file, so a retry leaves no torn line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::item::{Form, Item};
use crate::sink::{Sink, SinkError};

pub struct Files {
    dir: PathBuf,
    endpoint: String,
    max_bytes: u64,
    max_files: u32,
    /// The current file's number, the file and its length.
    current: Option<(u64, File, u64)>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> SinkError {
    SinkError::Io(format!("{what} {}: {e}", path.display()))
}

impl Files {
    pub fn open(
        dir: &Path,
        endpoint: &str,
        max_bytes: u64,
        max_files: u32,
    ) -> Result<Self, SinkError> {
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        Ok(Files {
            dir: dir.to_path_buf(),
            endpoint: endpoint.to_string(),
            max_bytes,
            max_files: max_files.max(1),
            current: None,
        })
    }

    fn path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{}.{n}.ndjson", self.endpoint))
    }

    /// The numbers of this endpoint's files in the directory, sorted.
    fn numbers(&self) -> Result<Vec<u64>, SinkError> {
        let prefix = format!("{}.", self.endpoint);
        let mut found = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io("cannot list", &self.dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let n = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|n| n.strip_suffix(".ndjson"))
                .and_then(|n| n.parse::<u64>().ok());
            found.extend(n);
        }
        found.sort_unstable();
        Ok(found)
    }

    fn open_number(&mut self, n: u64) -> Result<(), SinkError> {
        let path = self.path(n);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io("cannot open", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| io("cannot stat", &path, e))?
            .len();
        self.current = Some((n, file, len));
        Ok(())
    }

    /// Deletes the oldest files so at most `max_files` remain.
    fn prune(&self) -> Result<(), SinkError> {
        let numbers = self.numbers()?;
        let excess = numbers.len().saturating_sub(self.max_files as usize);
        for n in &numbers[..excess] {
            let path = self.path(*n);
            std::fs::remove_file(&path).map_err(|e| io("cannot delete", &path, e))?;
        }
        Ok(())
    }
}

impl Sink for Files {
    fn form(&self) -> Form {
        Form::Json
    }

    fn batch(&self) -> usize {
        1000
    }

    fn deliver(&mut self, items: &[Item]) -> Result<(), SinkError> {
        let mut lines = String::new();
        for item in items {
            lines.push_str(&item.json);
            lines.push('\n');
        }
        if self.current.is_none() {
            let last = self.numbers()?.last().copied().unwrap_or(1);
            self.open_number(last)?;
        }
        let full = self
            .current
            .as_ref()
            .is_some_and(|(_, _, len)| *len > 0 && len + lines.len() as u64 > self.max_bytes);
        if full {
            let next = self.current.as_ref().map_or(1, |c| c.0 + 1);
            self.open_number(next)?;
            self.prune()?;
        }
        let Some((n, file, len)) = self.current.as_mut() else {
            return Err(SinkError::Io("no current file".into()));
        };
        let path = self.dir.join(format!("{}.{n}.ndjson", self.endpoint));
        let written = file
            .write_all(lines.as_bytes())
            .and_then(|()| file.sync_data());
        match written {
            Ok(()) => {
                *len += lines.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut what part of the batch may have gone in; if even that fails, start
                // over with the next file on the next try.
                if file.set_len(*len).is_err() {
                    self.current = None;
                }
                Err(io("cannot write", &path, e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u64) -> Item {
        Item {
            partition: 0,
            offset: n,
            device: "d".into(),
            module: None,
            json: format!("{{\"offset\":{n},\"pad\":\"{}\"}}", "x".repeat(40)),
            body: Vec::new(),
            props: Vec::new(),
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("roost-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn lines_rotate_by_size_and_old_files_go() {
        let d = dir("rotate");
        let mut f = Files::open(&d, "arch", 130, 2).expect("open");
        for n in 0..10 {
            f.deliver(&[item(n)]).expect("deliver");
        }
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec!["arch.4.ndjson", "arch.5.ndjson"],
            "two files kept"
        );
        let last = std::fs::read_to_string(d.join("arch.5.ndjson")).expect("read");
        let offsets: Vec<u64> = last
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("json")["offset"]
                    .as_u64()
                    .expect("offset")
            })
            .collect();
        assert_eq!(
            offsets,
            vec![8, 9],
            "whole lines, in order, two 63-byte lines per 130-byte file"
        );
        // A new sink on the same directory appends to the newest file.
        let mut again = Files::open(&d, "arch", 10_000, 2).expect("open");
        again.deliver(&[item(10)]).expect("deliver");
        let last = std::fs::read_to_string(d.join("arch.5.ndjson")).expect("read");
        assert_eq!(last.lines().count(), 3);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_oversized_batch_still_lands_in_one_file() {
        let d = dir("big");
        let mut f = Files::open(&d, "a", 50, 3).expect("open");
        let batch: Vec<Item> = (0..5).map(item).collect();
        f.deliver(&batch).expect("deliver");
        f.deliver(&batch).expect("deliver");
        let one = std::fs::read_to_string(d.join("a.1.ndjson")).expect("read");
        let two = std::fs::read_to_string(d.join("a.2.ndjson")).expect("read");
        assert_eq!((one.lines().count(), two.lines().count()), (5, 5));
        let _ = std::fs::remove_dir_all(&d);
    }
}
