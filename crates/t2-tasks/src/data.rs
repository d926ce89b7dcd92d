//! Task files on disk: `data/tasks/<task>/task.json` (what the task is, where it came from) and one JSONL
//! file per split (`train.jsonl`, `val.jsonl`, `test.jsonl`), each line a [`TaskItem`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("task data not found at {0}: run `bash scripts/fetch-data.sh` first")]
    NoData(PathBuf),
    #[error("unknown task '{name}'; known tasks: {known}")]
    UnknownTask { name: String, known: String },
    #[error("task '{task}' has no {split} split")]
    NoSplit { task: String, split: String },
    #[error("{path}:{line}: {msg}")]
    BadItem {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, TaskError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

/// What a correct answer is, and so which verifier checks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Answer {
    /// A final number ("42", "-3.5", "1,250" all normalise).
    Number { value: String },
    /// One of `options` (the prompt lists them, lettered A, B, … when `lettered`).
    Choice {
        options: Vec<String>,
        correct: usize,
        #[serde(default)]
        lettered: bool,
    },
    /// A Python function named `entry_point`, checked by running `tests` (assert statements).
    Python {
        entry_point: String,
        tests: Vec<String>,
    },
}

/// One example: the user message and its checkable answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskItem {
    /// Unique within the task, stable across fetches (e.g. `arc_easy/Mercury_7220990`).
    pub id: String,
    pub prompt: String,
    pub answer: Answer,
    /// Multiple choice: the question without its listed options, which log-likelihood scoring asks
    /// instead of `prompt` (each option's text is then the reply it scores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stem: Option<String>,
}

/// `task.json`: what the task is and where its items came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskInfo {
    pub name: String,
    /// The skill area: math, code, reasoning, classification, routing.
    pub area: String,
    pub description: String,
    /// Package (with version and sha256) or generator (with seed) the items came from.
    pub source: String,
    /// Items per split, as written.
    pub counts: std::collections::BTreeMap<String, usize>,
}

/// Where `scripts/fetch-data.sh` leaves the task files, relative to the repository root.
pub const DEFAULT_DATA_DIR: &str = "data/tasks";

/// A task on disk: its description, and its split files read on demand.
#[derive(Debug, Clone)]
pub struct Task {
    pub info: TaskInfo,
    pub dir: PathBuf,
}

impl Task {
    /// Opens `<root>/<name>`; an unknown name lists the tasks that exist.
    pub fn open(root: &Path, name: &str) -> Result<Task> {
        let known = list(root)?;
        if !known.iter().any(|k| k == name) {
            return Err(TaskError::UnknownTask {
                name: name.to_string(),
                known: known.join(", "),
            });
        }
        let dir = root.join(name);
        let path = dir.join("task.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TaskError::Io(path.clone(), e))?;
        let info: TaskInfo = serde_json::from_str(&text).map_err(|e| TaskError::BadItem {
            path: path.clone(),
            line: e.line(),
            msg: e.to_string(),
        })?;
        Ok(Task { info, dir })
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn has_split(&self, split: Split) -> bool {
        self.split_path(split).is_file()
    }

    pub fn split_path(&self, split: Split) -> PathBuf {
        self.dir.join(format!("{}.jsonl", split.as_str()))
    }

    /// Every item of a split, in file order. A malformed line is an error naming file and line.
    pub fn items(&self, split: Split) -> Result<Vec<TaskItem>> {
        let path = self.split_path(split);
        if !path.is_file() {
            return Err(TaskError::NoSplit {
                task: self.info.name.clone(),
                split: split.as_str().into(),
            });
        }
        read_items(&path)
    }
}

/// Reads a JSONL file of [`TaskItem`]s (blank lines skipped).
pub fn read_items(path: &Path) -> Result<Vec<TaskItem>> {
    let text = std::fs::read_to_string(path).map_err(|e| TaskError::Io(path.to_path_buf(), e))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item: TaskItem = serde_json::from_str(line).map_err(|e| TaskError::BadItem {
            path: path.to_path_buf(),
            line: i + 1,
            msg: e.to_string(),
        })?;
        items.push(item);
    }
    Ok(items)
}

/// The task names under `root` (folders holding a `task.json`), sorted.
pub fn list(root: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(root).map_err(|_| TaskError::NoData(root.to_path_buf()))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("task.json").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    if names.is_empty() {
        return Err(TaskError::NoData(root.to_path_buf()));
    }
    names.sort();
    Ok(names)
}
