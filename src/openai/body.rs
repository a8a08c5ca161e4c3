//! The OpenAI API's request bodies, typed, and their proto form. Read
//! without buffering untyped values: a list of anything but what is
//! expected is refused at its first element, and no list is read past
//! [`MAX_LIST`] elements, whatever the body's size.

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

use super::{bad_request, ApiError};
use crate::engine::UNTIL_CONTEXT_FULL;
use internvl_api::proto;

/// Most elements any list in a body may have (messages, content parts,
/// inputs): the gRPC codec's bound on the wire, for the same reason.
pub(super) const MAX_LIST: usize = internvl_api::codec::MAX_WIRE_ELEMENTS;

/// A list's elements, at most [`MAX_LIST`].
fn bounded_seq<'de, T: Deserialize<'de>, A: serde::de::SeqAccess<'de>>(
    seq: &mut A,
) -> Result<Vec<T>, A::Error> {
    let mut items = Vec::new();
    while let Some(item) = seq.next_element()? {
        if items.len() == MAX_LIST {
            return Err(serde::de::Error::custom(format!(
                "a list of more than {MAX_LIST} elements"
            )));
        }
        items.push(item);
    }
    Ok(items)
}

/// `deserialize_with` for a bounded list.
fn bounded<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    struct Visitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            bounded_seq(&mut seq)
        }
    }
    deserializer.deserialize_seq(Visitor(std::marker::PhantomData))
}

#[derive(Deserialize)]
pub(super) struct ChatRequest {
    pub(super) model: Option<String>,
    #[serde(deserialize_with = "bounded")]
    messages: Vec<ChatMessage>,
    #[serde(default)]
    pub(super) stream: bool,
    pub(super) stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    response_format: Option<ResponseFormat>,
    n: Option<u32>,
    /// vLLM's extension: keep generating past the end-of-generation token.
    #[serde(default)]
    ignore_eos: bool,
    /// vLLM's extension: reuse cached prefixes only with requests of the
    /// same key and salt.
    #[serde(default)]
    cache_salt: String,
    // Known and not offered: refused by name rather than ignored (read
    // past, not kept).
    tools: Option<IgnoredAny>,
    tool_choice: Option<IgnoredAny>,
    functions: Option<IgnoredAny>,
    function_call: Option<IgnoredAny>,
    logit_bias: Option<IgnoredAny>,
    audio: Option<IgnoredAny>,
    prediction: Option<IgnoredAny>,
}

#[derive(Deserialize)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub(super) include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

/// A message's content: a string, or a list of parts. Read without
/// buffering (an untagged enum would hold the whole list as untyped values
/// first): a list of anything but part objects is refused at its first
/// element, whatever its length.
pub(super) enum Content {
    Text(String),
    Parts(Vec<RawPart>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Content, E> {
                Ok(Content::Text(text.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Content, E> {
                Ok(Content::Text(text))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Content, A::Error> {
                bounded_seq(&mut seq).map(Content::Parts)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// One content part as sent; [`part`] checks what it must hold, naming the
/// field.
#[derive(Deserialize)]
pub(super) struct RawPart {
    #[serde(rename = "type", default)]
    kind: String,
    text: Option<String>,
    image_url: Option<MediaUrl>,
    video_url: Option<MediaUrl>,
}

#[derive(Deserialize)]
struct MediaUrl {
    url: Option<String>,
    detail: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchema },
}

#[derive(Deserialize)]
struct JsonSchema {
    schema: Option<Value>,
}

/// One content part (`text`, `image_url`, `video_url`) as a proto part;
/// `param` names it.
pub(super) fn part(value: &RawPart, param: &str) -> Result<proto::Content, ApiError> {
    use proto::content::Part;
    let url = |key: &str, media: &Option<MediaUrl>| -> Result<(String, Option<String>), ApiError> {
        let media = media.as_ref();
        let url = media
            .and_then(|m| m.url.clone())
            .ok_or_else(|| bad_request(Some(&format!("{param}.{key}.url")), "a URL is required"))?;
        Ok((url, media.and_then(|m| m.detail.clone())))
    };
    let part =
        match value.kind.as_str() {
            "text" => Part::Text(value.text.clone().ok_or_else(|| {
                bad_request(Some(&format!("{param}.text")), "a string is required")
            })?),
            "image_url" => {
                let (url, detail) = url("image_url", &value.image_url)?;
                let max_tiles = match detail.as_deref() {
                    None | Some("auto") | Some("high") => 0,
                    // The reference's thumbnail: one tile of the whole image.
                    Some("low") => 1,
                    Some(other) => {
                        return Err(bad_request(
                            Some(&format!("{param}.image_url.detail")),
                            format!("{other:?}: expected \"low\", \"high\" or \"auto\""),
                        ))
                    }
                };
                Part::Image(proto::Image {
                    url,
                    max_tiles,
                    ..Default::default()
                })
            }
            "video_url" => Part::Video(proto::Video {
                url: url("video_url", &value.video_url)?.0,
                ..Default::default()
            }),
            other => {
                return Err(bad_request(
                    Some(&format!("{param}.type")),
                    format!("{other:?}: this API takes text, image_url and video_url parts"),
                ))
            }
        };
    Ok(proto::Content { part: Some(part) })
}

fn content(content: &Content, param: &str) -> Result<Vec<proto::Content>, ApiError> {
    match content {
        Content::Text(text) => Ok(vec![proto::Content {
            part: Some(proto::content::Part::Text(text.clone())),
        }]),
        Content::Parts(parts) => parts
            .iter()
            .enumerate()
            .map(|(i, p)| part(p, &format!("{param}[{i}]")))
            .collect(),
    }
}

impl ChatRequest {
    /// The proto request gRPC would carry.
    pub(super) fn to_proto(&self, request_id: String) -> Result<proto::GenerateRequest, ApiError> {
        for (name, set) in [
            ("tools", self.tools.is_some()),
            ("tool_choice", self.tool_choice.is_some()),
            ("functions", self.functions.is_some()),
            ("function_call", self.function_call.is_some()),
            ("logit_bias", self.logit_bias.is_some()),
            ("audio", self.audio.is_some()),
            ("prediction", self.prediction.is_some()),
        ] {
            if set {
                return Err(bad_request(Some(name), format!("{name} is not supported")));
            }
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(bad_request(Some("n"), "only n = 1 is supported"));
        }
        if self.top_logprobs.is_some() && self.logprobs != Some(true) {
            return Err(bad_request(
                Some("top_logprobs"),
                "top_logprobs needs logprobs = true",
            ));
        }
        let seed = match self.seed {
            Some(seed) => Some(
                u64::try_from(seed)
                    .map_err(|_| bad_request(Some("seed"), "must be a non-negative integer"))?,
            ),
            None => None,
        };
        let messages = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "system" | "developer" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => {
                        return Err(bad_request(
                            Some(&format!("messages[{i}].role")),
                            format!("{other:?}: expected system, developer, user or assistant"),
                        ))
                    }
                };
                let param = format!("messages[{i}].content");
                let content = match &m.content {
                    Some(c) => content(c, &param)?,
                    None => return Err(bad_request(Some(&param), "content is required")),
                };
                Ok(proto::Message {
                    role: role.into(),
                    content,
                })
            })
            .collect::<Result<_, _>>()?;
        let response_format = match &self.response_format {
            None | Some(ResponseFormat::Text) => None,
            Some(ResponseFormat::JsonObject) => Some(proto::response_format::Format::JsonObject(
                proto::JsonObject {},
            )),
            Some(ResponseFormat::JsonSchema { json_schema }) => {
                let schema = json_schema.schema.as_ref().ok_or_else(|| {
                    bad_request(
                        Some("response_format.json_schema.schema"),
                        "a schema is required",
                    )
                })?;
                Some(proto::response_format::Format::JsonSchema(
                    schema.to_string(),
                ))
            }
        };
        Ok(proto::GenerateRequest {
            messages,
            sampling: Some(proto::SamplingParams {
                // OpenAI's defaults: temperature 1, top_p 1.
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p.unwrap_or(1.0),
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                seed,
                ..Default::default()
            }),
            max_new_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(UNTIL_CONTEXT_FULL),
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            ignore_eos: self.ignore_eos,
            top_logprobs: self.top_logprobs.unwrap_or(0),
            request_id,
            logprobs: self.logprobs.unwrap_or(false),
            response_format: response_format.map(|format| proto::ResponseFormat {
                format: Some(format),
            }),
            cache_salt: self.cache_salt.clone(),
        })
    }
}

// ---- embeddings

#[derive(Deserialize)]
pub(super) struct EmbeddingsRequest {
    pub(super) model: Option<String>,
    pub(super) input: EmbedInputs,
    pub(super) encoding_format: Option<String>,
    pub(super) dimensions: Option<u32>,
    /// As the chat request's `cache_salt`.
    #[serde(default)]
    pub(super) cache_salt: String,
}

/// `input`: a string, a list of inputs, or token ids (refused by name).
pub(super) enum EmbedInputs {
    One(EmbedItem),
    Many(Vec<EmbedItem>),
    TokenIds,
}

/// One input: a string, or (this service's extension) a chat-style
/// `{"content": …}`.
pub(super) enum EmbedItem {
    Text(String),
    Object(Option<Content>),
    /// A number: in a list of them, the list is token ids.
    Number,
    /// A list (of token ids), read past.
    TokenIds,
    Other,
}

impl<'de> Deserialize<'de> for EmbedInputs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = EmbedInputs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string, a list of inputs, or an input object")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<EmbedInputs, E> {
                Ok(EmbedInputs::One(EmbedItem::Text(text.to_string())))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<EmbedInputs, A::Error> {
                ItemVisitor.visit_map(map).map(EmbedInputs::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<EmbedInputs, A::Error> {
                let items: Vec<EmbedItem> = bounded_seq(&mut seq)?;
                // A list of numbers is one input of token ids, not numbers.
                if items.iter().any(|i| matches!(i, EmbedItem::Number)) {
                    return Ok(EmbedInputs::TokenIds);
                }
                Ok(EmbedInputs::Many(items))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

struct ItemVisitor;

impl<'de> serde::de::Visitor<'de> for ItemVisitor {
    type Value = EmbedItem;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string or an input object")
    }
    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<EmbedItem, E> {
        Ok(EmbedItem::Text(text.to_string()))
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<EmbedItem, E> {
        Ok(EmbedItem::Number)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<EmbedItem, E> {
        Ok(EmbedItem::Number)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<EmbedItem, E> {
        Ok(EmbedItem::Number)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<EmbedItem, A::Error> {
        // Token ids: read past them without keeping any.
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(EmbedItem::TokenIds)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<EmbedItem, A::Error> {
        let mut content = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "content" {
                content = Some(map.next_value::<Content>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(EmbedItem::Object(content))
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<EmbedItem, E> {
        Ok(EmbedItem::Other)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<EmbedItem, E> {
        Ok(EmbedItem::Other)
    }
}

impl<'de> Deserialize<'de> for EmbedItem {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ItemVisitor)
    }
}

/// One `input` entry: a string, or (this service's extension) a chat-style
/// `{"content": [parts]}` with text, image_url and video_url parts.
pub(super) fn embed_input(item: &EmbedItem, param: &str) -> Result<proto::EmbedInput, ApiError> {
    let content = match item {
        EmbedItem::Text(text) => vec![proto::Content {
            part: Some(proto::content::Part::Text(text.clone())),
        }],
        EmbedItem::Object(None) => {
            return Err(bad_request(
                Some(&format!("{param}.content")),
                "an input object needs content",
            ))
        }
        EmbedItem::Object(Some(parts)) => content(parts, &format!("{param}.content"))?,
        EmbedItem::TokenIds | EmbedItem::Number => {
            return Err(bad_request(
                Some(param),
                "token ids are not taken as input; send text",
            ))
        }
        EmbedItem::Other => {
            return Err(bad_request(
                Some(param),
                "a string or an object with content",
            ))
        }
    };
    Ok(proto::EmbedInput { content })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(value: Value) -> RawPart {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_list_of_anything_but_parts_is_refused_at_its_first_element() {
        let zeros = format!("[{}0]", "0,".repeat(100_000));
        let err = serde_json::from_str::<Content>(&zeros).err().unwrap();
        assert_eq!(err.column(), 2, "{err}");
        assert!(matches!(
            serde_json::from_str::<Content>("\"hi\"").unwrap(),
            Content::Text(t) if t == "hi"
        ));
    }

    #[test]
    fn parts_become_proto_parts() {
        let low = json!({"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}});
        match part(&raw(low), "p").unwrap().part {
            Some(proto::content::Part::Image(image)) => {
                assert_eq!((image.url.as_str(), image.max_tiles), ("data:x", 1));
            }
            other => panic!("{other:?}"),
        }
        let video = json!({"type": "video_url", "video_url": {"url": "https://v/clip.mp4"}});
        assert!(matches!(
            part(&raw(video), "p").unwrap().part,
            Some(proto::content::Part::Video(v)) if v.url == "https://v/clip.mp4"
        ));
        let bad = json!({"type": "image_url", "image_url": {"url": "data:x", "detail": "max"}});
        assert_eq!(
            part(&raw(bad), "p").unwrap_err().param.as_deref(),
            Some("p.image_url.detail")
        );
        let audio = json!({"type": "input_audio", "input_audio": {}});
        assert_eq!(
            part(&raw(audio), "p").unwrap_err().param.as_deref(),
            Some("p.type")
        );
    }

    #[test]
    fn embeddings_input_is_read_as_it_comes() {
        let read = |text: &str| serde_json::from_str::<EmbedInputs>(text).unwrap();
        assert!(matches!(
            read("\"a\""),
            EmbedInputs::One(EmbedItem::Text(_))
        ));
        assert!(matches!(read("[\"a\", \"b\"]"), EmbedInputs::Many(v) if v.len() == 2));
        assert!(matches!(read("[1, 2, 3]"), EmbedInputs::TokenIds));
        assert!(matches!(
            read("[[1, 2], [3]]"),
            EmbedInputs::Many(v) if matches!(v[0], EmbedItem::TokenIds)
        ));
        assert!(matches!(
            read("{\"content\": \"x\", \"other\": [1]}"),
            EmbedInputs::One(EmbedItem::Object(Some(Content::Text(_))))
        ));
        // No list is read past its bound, whatever the body holds.
        let long = format!("[{}\"x\"]", "\"x\",".repeat(MAX_LIST));
        assert!(serde_json::from_str::<EmbedInputs>(&long).is_err());
    }
}
