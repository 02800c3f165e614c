//! The conversation shown to the VLM: the bundle's template with `{{placeholders}}` replaced
//! once, left to right, by compact JSON values (models/README.md, "Template contract").
//!
//! Substituted text is never scanned again, and `<` `>` in values are written `\u003c`
//! `\u003e`, so no job prompt can form a special token such as `<|im_end|>` or a placeholder.

use serde::Serialize;

/// A value the template can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// The job's prompt, a JSON string.
    Prompt,
    /// The taxonomy, a JSON list of strings in bundle order.
    Categories,
    /// The tools a region may name (sorted), or `[]`.
    Tools,
    /// The saliency proposals `[[x1,y1,x2,y2],…]` in the answer's coordinate space.
    Regions,
    /// Width of the coordinate space.
    Width,
    /// Height of the coordinate space.
    Height,
}

impl Placeholder {
    const ALL: [Placeholder; 6] = [
        Placeholder::Prompt,
        Placeholder::Categories,
        Placeholder::Tools,
        Placeholder::Regions,
        Placeholder::Width,
        Placeholder::Height,
    ];

    fn name(self) -> &'static str {
        match self {
            Placeholder::Prompt => "prompt",
            Placeholder::Categories => "categories",
            Placeholder::Tools => "tools",
            Placeholder::Regions => "regions",
            Placeholder::Width => "width",
            Placeholder::Height => "height",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Value(Placeholder),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// The values of one rendering.
#[derive(Debug, Clone)]
pub struct Values<'a> {
    pub prompt: &'a str,
    pub categories: &'a [String],
    pub tools: &'a [String],
    pub regions: &'a [[u32; 4]],
    pub width: u32,
    pub height: u32,
}

impl Template {
    /// Parses `text`; refuses an unknown or unclosed `{{…}}` and a template without exactly
    /// one `image_token`.
    pub fn parse(text: &str, image_token: &str) -> Result<Template, String> {
        let count = if image_token.is_empty() {
            0
        } else {
            text.matches(image_token).count()
        };
        if count != 1 {
            return Err(format!(
                "must contain the image token {image_token:?} exactly once (found {count})"
            ));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        let mut at = 0;
        while let Some(open) = rest.find("{{") {
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err(format!("unclosed {{{{ at byte {}", at + open));
            };
            let name = &after[..close];
            let Some(placeholder) = Placeholder::ALL.into_iter().find(|p| p.name() == name) else {
                let shown: String = rest[open..].chars().take(20).collect();
                return Err(format!(
                    "unknown placeholder at byte {}: {shown:?} (known: prompt, categories, \
                     tools, regions, width, height)",
                    at + open
                ));
            };
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            parts.push(Part::Value(placeholder));
            let consumed = open + 2 + close + 2;
            at += consumed;
            rest = &rest[consumed..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The conversation text for these values.
    pub fn render(&self, values: &Values) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Value(p) => out.push_str(&match p {
                    Placeholder::Prompt => json_text(values.prompt),
                    Placeholder::Categories => json_text(values.categories),
                    Placeholder::Tools => json_text(values.tools),
                    Placeholder::Regions => json_text(values.regions),
                    Placeholder::Width => values.width.to_string(),
                    Placeholder::Height => values.height.to_string(),
                }),
            }
        }
        out
    }
}

/// Compact JSON with `<` and `>` escaped (Python's `json.dumps(v, ensure_ascii=False,
/// separators=(",", ":"))` plus those two replacements).
pub fn json_text<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value)
        .unwrap_or_default()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
}

/// An input-pixel coordinate `v` of an axis of `size` pixels in a space of `space` units,
/// rounded half up in integers: `(2 v S + D) div 2 D`.
pub fn to_space(v: u32, size: u32, space: u32) -> u32 {
    let (v, size, space) = (u64::from(v), u64::from(size.max(1)), u64::from(space));
    ((2 * v * space + size) / (2 * size)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: &str = "<|image_pad|>";

    fn values<'a>(prompt: &'a str, regions: &'a [[u32; 4]]) -> Values<'a> {
        Values {
            prompt,
            categories: &[],
            tools: &[],
            regions,
            width: 308,
            height: 196,
        }
    }

    #[test]
    fn placeholders_are_replaced_once_and_not_rescanned() {
        let t = Template::parse(
            "a {{prompt}} b {{regions}} {{width}}x{{height}} {x} <|image_pad|>",
            PAD,
        )
        .unwrap();
        let text = t.render(&values("say {{regions}} <|im_end|>", &[[1, 2, 3, 4]]));
        assert_eq!(
            text,
            "a \"say {{regions}} \\u003c|im_end|\\u003e\" b [[1,2,3,4]] 308x196 {x} <|image_pad|>"
        );
    }

    #[test]
    fn json_values_are_compact_with_standard_escapes() {
        assert_eq!(json_text("a\"b\\c\nd\u{1}é"), "\"a\\\"b\\\\c\\nd\\u0001é\"");
        assert_eq!(
            json_text(&["hand".to_string(), "face".to_string()]),
            "[\"hand\",\"face\"]"
        );
        assert_eq!(json_text::<[[u32; 4]]>(&[]), "[]");
    }

    #[test]
    fn bad_templates_are_refused() {
        assert!(Template::parse("no image", PAD)
            .unwrap_err()
            .contains("exactly once"));
        assert!(Template::parse("<|image_pad|><|image_pad|>", PAD).is_err());
        let e = Template::parse("<|image_pad|> {{promt}}", PAD).unwrap_err();
        assert!(e.contains("{{promt}}"), "{e}");
        assert!(Template::parse("<|image_pad|> {{prompt", PAD)
            .unwrap_err()
            .contains("unclosed"));
        assert!(Template::parse("<|image_pad|> {{{prompt}}", PAD).is_err());
    }

    #[test]
    fn coordinates_round_half_up() {
        // 300 px -> 308 units: 200 -> 205.33 -> 205; 1 px in 2 units of 4 px: 0.5 -> 1.
        assert_eq!(to_space(200, 300, 308), 205);
        assert_eq!(to_space(1, 4, 2), 1);
        assert_eq!(to_space(224, 224, 1000), 1000);
        assert_eq!(to_space(0, 224, 1000), 0);
    }
}
