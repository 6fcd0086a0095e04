//! The input of a batch: a file of tasks, JSONL (`{"id", "prompt" | "contents", "system",
//! "metadata"}`) or plain text (one prompt a line, its id the line number), read whole and
//! checked line by line. A bad line (not JSON, no prompt, a second use of an id) is named by its
//! line number; the caller decides whether it skips the line or stops.

use keylease_client::gemini::{Content, GenerateContentRequest};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;

/// Longest id a task may have: ids are echoed in every result line and kept while the run lasts.
pub const MAX_ID_BYTES: usize = keylease::MAX_ID_BYTES;

/// One prompt to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: String,
    /// Its line in the input (from 1).
    pub line: usize,
    /// The conversation to send; the run adds the system instruction and generation settings.
    pub contents: Vec<Content>,
    /// The task's own system instruction, which replaces the run's.
    pub system: Option<String>,
    /// Echoed as it came in the task's result.
    pub metadata: Option<Value>,
}

impl Task {
    /// The request for this task: its contents, its system instruction or else `system`.
    pub fn request(
        &self,
        system: Option<&str>,
        base: &GenerateContentRequest,
    ) -> GenerateContentRequest {
        let system = self.system.as_deref().or(system);
        GenerateContentRequest {
            contents: self.contents.clone(),
            system_instruction: system.map(|text| Content {
                role: None,
                ..Content::user(text)
            }),
            ..base.clone()
        }
    }
}

/// How the input is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// By the file's extension (`.jsonl`, `.ndjson`, `.txt`), else by its first line.
    Auto,
    Jsonl,
    Text,
}

/// A line that cannot be run, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct BadLine {
    pub line: usize,
    pub reason: String,
}

/// What the input holds: the tasks, and the lines that are not tasks.
#[derive(Debug, Default)]
pub struct Input {
    pub tasks: Vec<Task>,
    pub bad: Vec<BadLine>,
    pub format: Option<Format>,
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read the input {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the input {path} is not UTF-8 text (line {line})")]
    NotText { path: String, line: usize },
}

/// Reads `path` (`-`: standard input) in `format`.
pub fn read(path: &Path, format: Format) -> Result<Input, InputError> {
    let shown = path.display().to_string();
    let bytes = if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).map(|_| bytes)
    } else {
        std::fs::read(path)
    }
    .map_err(|e| InputError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        InputError::NotText {
            path: shown.clone(),
            line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
        }
    })?;
    let format = match format {
        Format::Auto => detect(path, &text),
        chosen => chosen,
    };
    let mut input = parse(&text, format);
    input.format = Some(format);
    Ok(input)
}

fn detect(path: &Path, text: &str) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "ndjson") => Format::Jsonl,
        Some("txt") => Format::Text,
        _ => {
            let first = text.lines().map(str::trim).find(|l| !l.is_empty());
            if first.is_some_and(|l| l.starts_with('{')) {
                Format::Jsonl
            } else {
                Format::Text
            }
        }
    }
}

/// Parses the text of an input. Blank lines are no tasks and no errors.
pub fn parse(text: &str, format: Format) -> Input {
    let mut input = Input::default();
    let mut ids = HashSet::new();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let task = match format {
            Format::Jsonl | Format::Auto => jsonl_task(raw, line),
            Format::Text => Ok(Task {
                id: line.to_string(),
                line,
                contents: vec![Content::user(raw.trim_end_matches('\r'))],
                system: None,
                metadata: None,
            }),
        };
        match task {
            Ok(task) if !ids.insert(task.id.clone()) => input.bad.push(BadLine {
                line,
                reason: format!("id {:?} was already used by an earlier line", task.id),
            }),
            Ok(task) => input.tasks.push(task),
            Err(reason) => input.bad.push(BadLine { line, reason }),
        }
    }
    input
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTask {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    contents: Option<Vec<Content>>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
}

fn jsonl_task(raw: &str, line: usize) -> Result<Task, String> {
    let task: JsonTask = serde_json::from_str(raw).map_err(|e| {
        // serde_json counts columns on this one line; its line is always 1.
        format!("not a task: {} (column {})", strip_position(&e), e.column())
    })?;
    let id = match task.id {
        None | Some(Value::Null) => line.to_string(),
        Some(Value::String(id)) if id.is_empty() => return Err("`id` is empty".into()),
        Some(Value::String(id)) => id,
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(format!(
                "`id` must be a string or a number, not {}",
                kind(&other)
            ));
        }
    };
    if id.len() > MAX_ID_BYTES {
        return Err(format!("`id` is longer than {MAX_ID_BYTES} bytes"));
    }
    let contents = match (task.prompt, task.contents) {
        (Some(_), Some(_)) => return Err("give `prompt` or `contents`, not both".into()),
        (Some(prompt), None) if prompt.trim().is_empty() => {
            return Err("`prompt` is empty".into());
        }
        (Some(prompt), None) => vec![Content::user(prompt)],
        (None, Some(contents)) if contents.iter().all(|c| c.parts.is_empty()) => {
            return Err("`contents` has no parts".into());
        }
        (None, Some(contents)) => contents,
        (None, None) => return Err("no prompt: give `prompt` or `contents`".into()),
    };
    if let Some(metadata) = &task.metadata
        && !metadata.is_object()
    {
        return Err(format!(
            "`metadata` must be an object, not {}",
            kind(metadata)
        ));
    }
    Ok(Task {
        id,
        line,
        contents,
        system: task.system.filter(|s| !s.trim().is_empty()),
        metadata: task.metadata,
    })
}

/// serde's message without its " at line 1 column N" (the line is the input's, given apart).
fn strip_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt_of(task: &Task) -> &str {
        task.contents[0].parts[0].text.as_deref().unwrap()
    }

    #[test]
    fn jsonl_tasks_keep_ids_system_and_metadata() {
        let input = parse(
            concat!(
                "{\"id\": \"a\", \"prompt\": \"Hi\", \"system\": \"Be brief\", \"metadata\": {\"n\": 1}}\n",
                "\n",
                "{\"id\": 7, \"contents\": [{\"role\": \"user\", \"parts\": [{\"text\": \"Yo\"}]}]}\n",
                "{\"prompt\": \"no id\"}\n",
            ),
            Format::Jsonl,
        );
        assert!(input.bad.is_empty(), "{:?}", input.bad);
        let ids: Vec<_> = input.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["a", "7", "4"]);
        assert_eq!(prompt_of(&input.tasks[0]), "Hi");
        assert_eq!(input.tasks[0].system.as_deref(), Some("Be brief"));
        assert_eq!(input.tasks[0].metadata, Some(serde_json::json!({"n": 1})));
        assert_eq!(prompt_of(&input.tasks[1]), "Yo");
        assert_eq!(input.tasks[2].line, 4);
    }

    #[test]
    fn every_bad_line_is_named_by_its_number() {
        let input = parse(
            concat!(
                "{\"id\": \"a\", \"prompt\": \"ok\"}\n",
                "{\"id\": \"b\", \"prompt\": \n",
                "{\"id\": \"a\", \"prompt\": \"again\"}\n",
                "{\"id\": \"c\"}\n",
                "{\"id\": \"d\", \"prompt\": \"  \"}\n",
                "{\"id\": \"e\", \"promt\": \"typo\"}\n",
                "{\"id\": [1], \"prompt\": \"x\"}\n",
                "{\"id\": \"f\", \"prompt\": \"x\", \"metadata\": 3}\n",
                "{\"id\": \"g\", \"prompt\": \"x\", \"contents\": []}\n",
            ),
            Format::Jsonl,
        );
        assert_eq!(input.tasks.len(), 1);
        let lines: Vec<_> = input.bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7, 8, 9]);
        let text: Vec<_> = input.bad.iter().map(ToString::to_string).collect();
        assert!(
            text[0].starts_with("line 2: not a task: EOF"),
            "{}",
            text[0]
        );
        assert!(text[1].contains("already used"), "{}", text[1]);
        assert!(text[2].contains("no prompt"), "{}", text[2]);
        assert!(text[3].contains("empty"), "{}", text[3]);
        assert!(text[4].contains("unknown field `promt`"), "{}", text[4]);
        assert!(text[5].contains("string or a number"), "{}", text[5]);
        assert!(text[6].contains("must be an object"), "{}", text[6]);
        assert!(text[7].contains("not both"), "{}", text[7]);
    }

    #[test]
    fn plain_text_ids_are_line_numbers() {
        let input = parse("first\r\n\nthird\n", Format::Text);
        let ids: Vec<_> = input.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["1", "3"]);
        assert_eq!(prompt_of(&input.tasks[0]), "first");
    }

    #[test]
    fn the_format_is_told_by_extension_or_first_line() {
        assert_eq!(detect(Path::new("a.txt"), "{\"x\":1}"), Format::Text);
        assert_eq!(detect(Path::new("a.jsonl"), "hello"), Format::Jsonl);
        assert_eq!(
            detect(Path::new("a"), "\n  {\"prompt\": \"x\"}"),
            Format::Jsonl
        );
        assert_eq!(detect(Path::new("a"), "What is 2+2?"), Format::Text);
    }

    #[test]
    fn a_task_system_instruction_replaces_the_runs() {
        let input = parse(
            "{\"id\": 1, \"prompt\": \"x\", \"system\": \"own\"}\n{\"id\": 2, \"prompt\": \"y\"}\n",
            Format::Jsonl,
        );
        let base = GenerateContentRequest::default();
        let own = input.tasks[0].request(Some("run"), &base);
        let run = input.tasks[1].request(Some("run"), &base);
        let text = |r: &GenerateContentRequest| {
            r.system_instruction.as_ref().unwrap().parts[0]
                .text
                .clone()
                .unwrap()
        };
        assert_eq!(text(&own), "own");
        assert_eq!(text(&run), "run");
        assert!(
            input.tasks[1]
                .request(None, &base)
                .system_instruction
                .is_none()
        );
    }
}
