//! The VLM's answer: lenient parsing of the generated text, strict validation of every region
//! (models/README.md, "Answer parsing and validation"; `models/vlm-reference/answer.py` is the
//! reference). A malformed answer is an outcome, not an error: it is reported and the caller
//! falls back.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::spec::Coordinates;

const FENCE: &str = "```";
const MAX_DEPTH: usize = 64;

/// Why an answer could not be read at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Malformed {
    /// No `[` or `{` in the (fenced) text.
    NoJson,
    /// The value at the first `[` or `{` is not strict JSON (or nests deeper than 64).
    InvalidJson,
}

impl Malformed {
    pub fn as_str(self) -> &'static str {
        match self {
            Malformed::NoJson => "no_json",
            Malformed::InvalidJson => "invalid_json",
        }
    }
}

/// Why an element of the answer was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    NotObject,
    BadBbox,
    MissingCategory,
    UnknownCategory,
    MissingInstruction,
    EmptyBox,
    OutsideImage,
    OverMaxRegions,
}

/// What validation changed in a kept region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Note {
    /// The tool is not a string naming a tool of the bundle: routing decides.
    UnknownTool,
    /// The bundle does not let regions name their tool.
    ToolNotAllowed,
    /// The box was clipped to the image.
    Clipped,
}

/// One kept region, in input-image pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerRegion {
    /// `[x1, y1, x2, y2]`, x2 and y2 exclusive.
    pub bbox: [u32; 4],
    pub category: String,
    pub instruction: String,
    pub tool: Option<String>,
    pub notes: Vec<Note>,
}

/// A dropped element: its index in the answer and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub index: usize,
    pub reason: DropReason,
}

/// The validated answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub error: Option<Malformed>,
    pub regions: Vec<AnswerRegion>,
    pub dropped: Vec<Dropped>,
}

/// What an answer is validated against.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub categories: &'a [String],
    pub tools: &'a [String],
    pub allow_tool: bool,
    pub max_regions: usize,
    pub coordinates: Coordinates,
    /// `(width, height)` of the input image.
    pub image: (u32, u32),
    /// `(width, height)` of the smart-resized image.
    pub resized: (u32, u32),
}

/// The first fenced block of `text` (after the fence and an info-string line), or all of it.
fn fenced_block(text: &str) -> &str {
    let Some(start) = text.find(FENCE) else {
        return text;
    };
    let mut body = &text[start + FENCE.len()..];
    // An info string ([A-Za-z0-9_-]*, then blanks) ending the fence line is skipped.
    let info = body
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
        .count();
    let blanks = body[info..]
        .bytes()
        .take_while(|b| *b == b' ' || *b == b'\t')
        .count();
    let after = &body[info + blanks..];
    if let Some(rest) = after
        .strip_prefix("\r\n")
        .or_else(|| after.strip_prefix('\n'))
    {
        body = rest;
    }
    match body.find(FENCE) {
        Some(end) => &body[..end],
        None => body,
    }
}

/// The JSON value at the first `[` or `{` (trailing text ignored).
pub fn first_json(text: &str) -> Result<Value, Malformed> {
    let block = fenced_block(text);
    let start = match (block.find('['), block.find('{')) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return Err(Malformed::NoJson),
    };
    let value = serde_json::Deserializer::from_str(&block[start..])
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .ok_or(Malformed::InvalidJson)?;
    if depth(&value) > MAX_DEPTH {
        return Err(Malformed::InvalidJson);
    }
    Ok(value)
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Parses and validates a generated text.
pub fn validate(text: &str, rules: &Rules) -> Answer {
    let value = match first_json(text) {
        Ok(v) => v,
        Err(e) => {
            return Answer {
                error: Some(e),
                regions: Vec::new(),
                dropped: Vec::new(),
            }
        }
    };
    let items = match value {
        Value::Array(items) => items,
        other => vec![other],
    };
    let (w, h) = rules.image;
    let (sw, sh) = rules.coordinates.size(rules.image, rules.resized);
    let (w, h, sw, sh) = (f64::from(w), f64::from(h), f64::from(sw), f64::from(sh));
    let mut regions = Vec::new();
    let mut dropped = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let mut drop = |reason| dropped.push(Dropped { index, reason });
        let Value::Object(item) = item else {
            drop(DropReason::NotObject);
            continue;
        };
        let bbox: Option<Vec<f64>> = match item.get("bbox_2d") {
            Some(Value::Array(b)) if b.len() == 4 => b.iter().map(Value::as_f64).collect(),
            _ => None,
        };
        let Some(b) = bbox else {
            drop(DropReason::BadBbox);
            continue;
        };
        let Some(Value::String(category)) = item.get("category") else {
            drop(DropReason::MissingCategory);
            continue;
        };
        if !rules.categories.contains(category) {
            drop(DropReason::UnknownCategory);
            continue;
        }
        let Some(Value::String(instruction)) = item.get("instruction") else {
            drop(DropReason::MissingInstruction);
            continue;
        };
        let mut notes = Vec::new();
        let mut tool = None;
        if let Some(named) = item.get("tool") {
            match named {
                _ if !rules.allow_tool => notes.push(Note::ToolNotAllowed),
                Value::String(t) if rules.tools.contains(t) => tool = Some(t.clone()),
                _ => notes.push(Note::UnknownTool),
            }
        }
        let x1 = (b[0] * w / sw).floor();
        let y1 = (b[1] * h / sh).floor();
        let x2 = (b[2] * w / sw).ceil();
        let y2 = (b[3] * h / sh).ceil();
        if x2 <= x1 || y2 <= y1 {
            drop(DropReason::EmptyBox);
            continue;
        }
        let clip = |v: f64, max: f64| v.clamp(0.0, max);
        let clipped = [clip(x1, w), clip(y1, h), clip(x2, w), clip(y2, h)];
        if clipped[2] <= clipped[0] || clipped[3] <= clipped[1] {
            drop(DropReason::OutsideImage);
            continue;
        }
        if clipped != [x1, y1, x2, y2] {
            notes.push(Note::Clipped);
        }
        if regions.len() >= rules.max_regions {
            drop(DropReason::OverMaxRegions);
            continue;
        }
        regions.push(AnswerRegion {
            bbox: clipped.map(|v| v as u32),
            category: category.clone(),
            instruction: instruction.clone(),
            tool,
            notes,
        });
    }
    Answer {
        error: None,
        regions,
        dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HAND: &str = r#"{"bbox_2d":[10,20,30,40],"category":"hand","instruction":"Fix it."}"#;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn check_with(text: &str, edit: impl FnOnce(&mut Rules)) -> Answer {
        let categories = strings(&["hand", "face", "object"]);
        let tools = strings(&["onnx-inpaint", "patchmatch"]);
        let mut rules = Rules {
            categories: &categories,
            tools: &tools,
            allow_tool: true,
            max_regions: 16,
            coordinates: Coordinates::Input,
            image: (200, 100),
            resized: (196, 84),
        };
        edit(&mut rules);
        validate(text, &rules)
    }

    fn check(text: &str) -> Answer {
        check_with(text, |_| {})
    }

    fn reasons(a: &Answer) -> Vec<DropReason> {
        a.dropped.iter().map(|d| d.reason).collect()
    }

    #[test]
    fn lenient_parse() {
        let a = check(&format!("[{HAND}]"));
        assert_eq!(a.error, None);
        assert_eq!(a.regions[0].bbox, [10, 20, 30, 40]);
        assert_eq!(a.regions[0].instruction, "Fix it.");
        assert!(a.regions[0].notes.is_empty());
        let fenced = format!("Sure!\n```json\n[{HAND}]\n```\nAnything else?");
        assert_eq!(check(&fenced).regions.len(), 1);
        assert_eq!(check(&format!("```\n[{HAND}]")).regions.len(), 1);
        assert_eq!(check(&format!("```[{HAND}]```")).regions.len(), 1);
        let prose = format!("The regions are: [{HAND}] and that is all. [1]");
        assert_eq!(check(&prose).regions.len(), 1);
        assert_eq!(check(HAND).regions.len(), 1);
        let empty = check("[]");
        assert_eq!(
            (empty.error, empty.regions.len(), empty.dropped.len()),
            (None, 0, 0)
        );
    }

    #[test]
    fn malformed_answers() {
        assert_eq!(
            check("Nothing is wrong with this image.").error,
            Some(Malformed::NoJson)
        );
        assert_eq!(check("context error").error, Some(Malformed::NoJson));
        let invalid = [
            format!("[{HAND}"),
            format!("[{HAND},]"),
            "[{'bbox_2d': [1,2,3,4]}]".to_string(),
            r#"[{"bbox_2d":[NaN,1,2,3]}]"#.to_string(),
            r#"[{"bbox_2d":[1e400,1,2,3]}]"#.to_string(),
            "[".repeat(65) + &"]".repeat(65),
            "[\"a\u{1}\"]".to_string(),
            // Python's json accepts a lone surrogate escape; serde_json does not (documented).
            r#"[{"bbox_2d":[1,2,3,4],"category":"hand","instruction":"\ud800"}]"#.to_string(),
        ];
        for text in invalid {
            assert_eq!(check(&text).error, Some(Malformed::InvalidJson), "{text}");
        }
        assert_eq!(check(&("[".repeat(64) + &"]".repeat(64))).error, None);
        assert_eq!(first_json("see [x] then [1]"), Err(Malformed::InvalidJson));
        assert_eq!(
            first_json(r#"x {"a":1} [2]"#),
            Ok(serde_json::json!({"a": 1}))
        );
    }

    #[test]
    fn strict_validation() {
        let a = check(&format!(
            r#"[{{"bbox_2d":[1,2,3,4],"category":"dragon","instruction":"x"}},{HAND}]"#
        ));
        assert_eq!(a.regions[0].category, "hand");
        assert_eq!(
            a.dropped,
            vec![Dropped {
                index: 0,
                reason: DropReason::UnknownCategory
            }]
        );
        let a = check(r#"[{"bbox_2d":[1,2,3,4],"category":"Hand","instruction":"x"}]"#);
        assert_eq!(reasons(&a), vec![DropReason::UnknownCategory]);
        let a = check(
            r#"[1, {"category":"hand","instruction":"x"}, {"bbox_2d":[1,2,3],"category":"hand","instruction":"x"},
               {"bbox_2d":[1,2,3,true],"category":"hand","instruction":"x"},
               {"bbox_2d":[1,2,3,4],"instruction":"x"}, {"bbox_2d":[1,2,3,4],"category":"hand"},
               {"bbox_2d":[1,2,3,4],"category":"hand","instruction":7}]"#,
        );
        use DropReason::*;
        assert_eq!(
            reasons(&a),
            vec![
                NotObject,
                BadBbox,
                BadBbox,
                BadBbox,
                MissingCategory,
                MissingInstruction,
                MissingInstruction
            ]
        );
        let a = check(
            r#"[{"bbox_2d":[1,2,3,4],"category":"dragon","category":"face","instruction":"x"}]"#,
        );
        assert_eq!(a.regions[0].category, "face");
    }

    #[test]
    fn boxes() {
        let a = check(r#"[{"bbox_2d":[-5,90,250,130],"category":"face","instruction":"x"}]"#);
        assert_eq!(a.regions[0].bbox, [0, 90, 200, 100]);
        assert_eq!(a.regions[0].notes, vec![Note::Clipped]);
        let a = check(r#"[{"bbox_2d":[210,10,250,20],"category":"face","instruction":"x"}]"#);
        assert_eq!(reasons(&a), vec![DropReason::OutsideImage]);
        let a = check(
            r#"[{"bbox_2d":[30,10,30,20],"category":"face","instruction":"x"},
               {"bbox_2d":[40,10,30,20],"category":"face","instruction":"x"}]"#,
        );
        assert_eq!(
            reasons(&a),
            vec![DropReason::EmptyBox, DropReason::EmptyBox]
        );
        let a = check(r#"[{"bbox_2d":[10.7,20.2,30.1,40.0],"category":"hand","instruction":"x"}]"#);
        assert_eq!(a.regions[0].bbox, [10, 20, 31, 40]);
        let boxed = r#"[{"bbox_2d":[98,42,196,84],"category":"hand","instruction":"x"}]"#;
        let a = check_with(boxed, |r| r.coordinates = Coordinates::Resized);
        assert_eq!(a.regions[0].bbox, [100, 50, 200, 100]);
        let boxed = r#"[{"bbox_2d":[0,0,333,500],"category":"hand","instruction":"x"}]"#;
        let a = check_with(boxed, |r| r.coordinates = Coordinates::Norm1000);
        assert_eq!(a.regions[0].bbox, [0, 0, 67, 50]);
    }

    #[test]
    fn tools_and_limits() {
        let a = check(
            r#"[{"bbox_2d":[1,2,3,4],"category":"hand","instruction":"x","tool":"patchmatch"},
               {"bbox_2d":[1,2,3,4],"category":"hand","instruction":"x","tool":"airbrush"},
               {"bbox_2d":[1,2,3,4],"category":"hand","instruction":"x","tool":3}]"#,
        );
        let tools: Vec<_> = a
            .regions
            .iter()
            .map(|r| (r.tool.clone(), r.notes.clone()))
            .collect();
        assert_eq!(
            tools,
            vec![
                (Some("patchmatch".to_string()), vec![]),
                (None, vec![Note::UnknownTool]),
                (None, vec![Note::UnknownTool])
            ]
        );
        let one =
            r#"[{"bbox_2d":[1,2,3,4],"category":"hand","instruction":"x","tool":"patchmatch"}]"#;
        let a = check_with(one, |r| r.allow_tool = false);
        assert_eq!(
            (a.regions[0].tool.clone(), a.regions[0].notes.clone()),
            (None, vec![Note::ToolNotAllowed])
        );
        let many = format!("[{}]", [HAND; 5].join(","));
        let a = check_with(&many, |r| r.max_regions = 3);
        assert_eq!(a.regions.len(), 3);
        assert_eq!(
            a.dropped,
            vec![
                Dropped {
                    index: 3,
                    reason: DropReason::OverMaxRegions
                },
                Dropped {
                    index: 4,
                    reason: DropReason::OverMaxRegions
                }
            ]
        );
    }
}
