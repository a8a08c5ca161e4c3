//! From chat messages to what the model reads: the GGUF's own chat template,
//! rendered with a Jinja engine, then media placeholders expanded into
//! `<img>` + tile embeddings + `</img>` exactly as the reference processor does.

use std::sync::Arc;

use minijinja::{context, Environment, Value};
use serde::Serialize;

use super::error::EngineError;
use super::media_budget::MediaHold;
use super::types::CachePartition;
use super::video::{Sampling, DEFAULT_FRAMES};
use super::vision::{self, DecodeLimits, TileSpec, TiledImage};
use image::RgbImage;

/// What the template renders for an image part, replaced by the image block.
pub const IMAGE_PLACEHOLDER: &str = "<IMG_CONTEXT>";
/// What the template renders for a video part, replaced by the frame blocks.
pub const VIDEO_PLACEHOLDER: &str = "<video>";
const IMAGE_START: &str = "<img>";
const IMAGE_END: &str = "</img>";

/// Who speaks a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Instructions ahead of the conversation.
    System,
    /// The person asking.
    User,
    /// The model's earlier replies.
    Assistant,
}

impl Role {
    /// The role name the chat template expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// An encoded image and its tiling limits (0 = the model's default).
#[derive(Clone, Debug)]
pub struct ImageInput {
    /// Encoded image bytes (untrusted).
    pub data: Vec<u8>,
    /// Most tiles, 0 = default.
    pub max_tiles: u32,
    /// Fewest tiles, 0 = default.
    pub min_tiles: u32,
}

/// A video and how to sample it.
#[derive(Clone, Debug)]
pub struct VideoInput {
    /// Its frames, or the file they are in.
    pub source: VideoSource,
    /// Which frames the model sees.
    pub sampling: Sampling,
}

/// Where a video's frames come from.
#[derive(Clone, Debug)]
pub enum VideoSource {
    /// Encoded frames in order (untrusted), sampled by the prompt builder.
    Frames(Vec<Vec<u8>>),
    /// An encoded video file (untrusted) that the service has yet to decode
    /// into [`VideoSource::Sampled`]: the engine takes no files.
    File(Vec<u8>),
    /// The frames sampled from a decoded file, in order.
    Sampled(Vec<RgbImage>),
}

impl VideoInput {
    /// How many frames (tiles) this video will give, as far as is known
    /// before a file is decoded (then: `num_frames`, or the default).
    pub fn frames_hint(&self) -> usize {
        let asked = self.sampling.num_frames as usize;
        match &self.source {
            VideoSource::Sampled(frames) => frames.len(),
            VideoSource::Frames(frames) if asked == 0 => frames.len().min(DEFAULT_FRAMES as usize),
            _ if asked == 0 => DEFAULT_FRAMES as usize,
            _ => asked,
        }
    }
}

/// One part of a message.
#[derive(Clone, Debug)]
pub enum Part {
    /// Plain text.
    Text(String),
    /// One image.
    Image(ImageInput),
    /// One video.
    Video(VideoInput),
}

/// One chat message.
#[derive(Clone, Debug)]
pub struct ChatMessage {
    /// Speaker.
    pub role: Role,
    /// Parts in order.
    pub parts: Vec<Part>,
}

/// Tiling of one image (or one video frame) in a prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageGrid {
    /// Grid columns.
    pub cols: u32,
    /// Grid rows.
    pub rows: u32,
    /// Tiles encoded, thumbnail included.
    pub tiles: u32,
}

/// A piece of a prepared prompt.
#[derive(Clone, Debug)]
pub enum Piece {
    /// Text tokens.
    Tokens(Vec<i32>),
    /// The tiles of one image or frame; each becomes `tokens_per_tile` embeddings.
    Image(Arc<TiledImage>),
}

/// A prompt ready for the engine: token runs and tiles in order.
#[derive(Clone, Debug)]
pub struct Prompt {
    /// Pieces in prompt order.
    pub pieces: Vec<Piece>,
    /// Per image or frame, its grid.
    pub grids: Vec<ImageGrid>,
    /// Every position: text, image embeddings and markers.
    pub prompt_tokens: u32,
    /// Image-embedding positions only.
    pub image_tokens: u32,
}

/// One unit of a prompt in decode order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptItem {
    /// One text position.
    Token(i32),
    /// Tile `tile` of the image in `pieces[piece]`: `tokens_per_tile` positions.
    Tile {
        /// Index of the image piece.
        piece: usize,
        /// Index of the tile within it.
        tile: usize,
    },
}

impl Prompt {
    /// Tiles of every image and frame, thumbnails included.
    pub fn tiles(&self) -> u32 {
        self.grids.iter().map(|g| g.tiles).sum()
    }

    /// The prompt flattened into tokens and tiles, in decode order.
    pub fn items(&self) -> Vec<PromptItem> {
        let mut items = Vec::with_capacity(self.prompt_tokens as usize);
        for (piece, p) in self.pieces.iter().enumerate() {
            match p {
                Piece::Tokens(tokens) => items.extend(tokens.iter().map(|&t| PromptItem::Token(t))),
                Piece::Image(tiled) => items
                    .extend((0..tiled.tiles.len()).map(|tile| PromptItem::Tile { piece, tile })),
            }
        }
        items
    }

    /// Keys its tiles to `partition`: a tile's hash becomes the hash of the
    /// partition and its pixels' hash, so its encoding and its KV cells are
    /// reused only by requests of the same partition, and whether another
    /// caller sent the same image cannot be learnt from `cached_image_tiles`.
    pub fn partition(&mut self, partition: &CachePartition) {
        use sha2::{Digest, Sha256};
        for piece in &mut self.pieces {
            if let Piece::Image(tiled) = piece {
                for hash in &mut Arc::make_mut(tiled).hashes {
                    *hash = Sha256::new()
                        .chain_update(partition.0)
                        .chain_update(*hash)
                        .finalize()
                        .into();
                }
            }
        }
    }

    /// The image a [`PromptItem::Tile`] points at, if it does.
    pub fn tiled_image(&self, piece: usize) -> Option<&TiledImage> {
        match self.pieces.get(piece)? {
            Piece::Image(tiled) => Some(tiled),
            Piece::Tokens(_) => None,
        }
    }

    /// Every token id of the text pieces, in order (image positions left out).
    pub fn text_tokens(&self) -> impl Iterator<Item = i32> + '_ {
        self.pieces
            .iter()
            .flat_map(|p| match p {
                Piece::Tokens(t) => t.as_slice(),
                Piece::Image(_) => &[],
            })
            .copied()
    }
}

#[derive(Serialize)]
struct TemplatePart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

/// Media in the order the rendered prompt mentions them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MediaKind {
    Image,
    Video,
}

/// A rendered prompt split at its media placeholders.
#[derive(Debug, PartialEq, Eq)]
enum Segment {
    Text(String),
    Media(MediaKind),
}

/// The model's chat template, compiled once.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `source` (Hugging Face Jinja, Python-style methods allowed).
    pub fn new(source: String, bos: String, eos: String) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template_owned("chat", source).map_err(|e| {
            EngineError::Template(format!("cannot compile the model's chat template: {e}"))
        })?;
        Ok(Self { env, bos, eos })
    }

    fn render_with(&self, messages: Vec<Value>) -> Result<String, EngineError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos.clone(),
                eos_token => self.eos.clone(),
            })
            .map_err(|e| EngineError::Template(e.to_string()))
    }

    /// Renders the conversation. Media parts are given to the template as typed
    /// parts first; a template that ignores them (a plain-text template) is
    /// rendered again with the placeholders written into the text, as
    /// InternVL's own chat code does.
    fn render(&self, messages: &[ChatMessage]) -> Result<Vec<Segment>, EngineError> {
        let media: Vec<MediaKind> = messages
            .iter()
            .flat_map(|m| m.parts.iter())
            .filter_map(|p| match p {
                Part::Text(_) => None,
                Part::Image(_) => Some(MediaKind::Image),
                Part::Video(_) => Some(MediaKind::Video),
            })
            .collect();
        let typed = messages.iter().map(|m| {
            let all_text = m.parts.iter().all(|p| matches!(p, Part::Text(_)));
            let content = if all_text {
                Value::from(join_text(&m.parts))
            } else {
                Value::from_serialize(
                    m.parts
                        .iter()
                        .map(|p| match p {
                            Part::Text(t) => TemplatePart {
                                kind: "text",
                                text: Some(t),
                            },
                            Part::Image(_) => TemplatePart {
                                kind: "image",
                                text: None,
                            },
                            Part::Video(_) => TemplatePart {
                                kind: "video",
                                text: None,
                            },
                        })
                        .collect::<Vec<_>>(),
                )
            };
            message_value(m.role, content)
        });
        let segments = split_placeholders(&self.render_with(typed.collect())?);
        if media_of(&segments) == media {
            return Ok(segments);
        }
        let inline = messages.iter().map(|m| {
            let text: String = m
                .parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => t.as_str(),
                    Part::Image(_) => "<IMG_CONTEXT>\n",
                    Part::Video(_) => "<video>\n",
                })
                .collect();
            message_value(m.role, Value::from(text))
        });
        let segments = split_placeholders(&self.render_with(inline.collect())?);
        if media_of(&segments) == media {
            Ok(segments)
        } else {
            Err(EngineError::Template(
                "the model's chat template drops image or video parts".into(),
            ))
        }
    }
}

fn join_text(parts: &[Part]) -> String {
    parts
        .iter()
        .filter_map(|p| match p {
            Part::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

fn message_value(role: Role, content: Value) -> Value {
    context! { role => role.as_str(), content => content }
}

fn media_of(segments: &[Segment]) -> Vec<MediaKind> {
    segments
        .iter()
        .filter_map(|s| match s {
            Segment::Media(k) => Some(*k),
            Segment::Text(_) => None,
        })
        .collect()
}

fn split_placeholders(rendered: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut rest = rendered;
    loop {
        let image = rest
            .find(IMAGE_PLACEHOLDER)
            .map(|i| (i, MediaKind::Image, IMAGE_PLACEHOLDER.len()));
        let video = rest
            .find(VIDEO_PLACEHOLDER)
            .map(|i| (i, MediaKind::Video, VIDEO_PLACEHOLDER.len()));
        let next = match (image, video) {
            (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        match next {
            Some((at, kind, len)) => {
                if at > 0 {
                    out.push(Segment::Text(rest[..at].to_string()));
                }
                out.push(Segment::Media(kind));
                rest = &rest[at + len..];
            }
            None => {
                if !rest.is_empty() {
                    out.push(Segment::Text(rest.to_string()));
                }
                return out;
            }
        }
    }
}

/// Text to the model's token ids. The engine's llama.cpp model is the one that
/// serves; tests and fuzz targets give a stand-in.
pub trait TextTokenizer {
    /// The tokens of `text`: `add_special` adds the model's BOS where it takes
    /// one, `parse_special` reads special-token text as those tokens.
    fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<i32>, EngineError>;
}

/// What one request's prompt may grow to, checked as it is built: every
/// tile costs memory (its RGB pixels, about 600 KB at 448×448) from the
/// moment it is cut, so a request is stopped at the first tile or token
/// past its budget, not after the whole prompt exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptBudget {
    /// Tiles (thumbnails and video frames included) the request's images
    /// may be cut into, across all its messages or inputs
    /// (`max_tiles_per_request`).
    pub max_tiles: u32,
    /// Prompt positions (text tokens and image tokens) one prompt may hold:
    /// the context.
    pub max_tokens: u32,
}

impl PromptBudget {
    /// No bound (tests and fuzz targets whose inputs are small).
    pub const UNBOUNDED: Self = Self {
        max_tiles: u32::MAX,
        max_tokens: u32::MAX,
    };
}

/// Bytes one tile's RGB pixels take.
pub fn tile_bytes(spec: &TileSpec) -> u64 {
    u64::from(spec.tile_size) * u64::from(spec.tile_size) * 3
}

/// Turns messages or embed inputs into a [`Prompt`]: decodes and tiles media,
/// tokenizes text runs. Runs on a blocking thread, never on the engine thread.
pub struct PromptBuilder<'a> {
    model: &'a dyn TextTokenizer,
    spec: TileSpec,
    limits: DecodeLimits,
    budget: PromptBudget,
    /// The request's share of `media_memory_mb`: every decode and every
    /// tile takes from it first.
    media: &'a mut MediaHold,
    /// The field a prompt past its context is refused under (`messages`,
    /// `inputs[2]`).
    scope: String,
    text: String,
    pieces: Vec<Piece>,
    grids: Vec<ImageGrid>,
    text_tokens: u32,
    tiles: u32,
}

impl<'a> PromptBuilder<'a> {
    /// A builder for `model` with the encoder's tiling and the decode
    /// limits, refusing under `scope` past `budget`.
    pub fn new(
        model: &'a dyn TextTokenizer,
        spec: TileSpec,
        limits: DecodeLimits,
        budget: PromptBudget,
        media: &'a mut MediaHold,
        scope: &str,
    ) -> Self {
        Self {
            model,
            spec,
            limits,
            budget,
            media,
            scope: scope.to_string(),
            text: String::new(),
            pieces: Vec::new(),
            grids: Vec::new(),
            text_tokens: 0,
            tiles: 0,
        }
    }

    /// Positions the prompt holds so far.
    fn tokens(&self) -> u64 {
        u64::from(self.text_tokens) + u64::from(self.tiles) * u64::from(self.spec.tokens_per_tile)
    }

    /// Refuses `tiles` more tiles for the media part at `field` when they
    /// pass the request's tile budget or the context; called before the
    /// tiles are cut (and, for frames a client sent, before they are
    /// decoded).
    fn reserve_tiles(&mut self, tiles: u32, field: &str) -> Result<(), EngineError> {
        let total = self.tiles.saturating_add(tiles);
        if total > self.budget.max_tiles {
            return Err(EngineError::invalid(
                field,
                format!(
                    "its {tiles} tiles make {total} in this request, more than \
                     max_tiles_per_request ({})",
                    self.budget.max_tiles
                ),
            ));
        }
        let tokens = self.tokens() + u64::from(tiles) * u64::from(self.spec.tokens_per_tile);
        if tokens > u64::from(self.budget.max_tokens) {
            return Err(self.past_context(tokens));
        }
        self.media
            .take(u64::from(tiles) * tile_bytes(&self.spec), field)
    }

    /// Decodes an image or frame at `field`, its pixels taken from the
    /// request's media budget before they are decoded.
    fn decode(&mut self, data: &[u8], field: &str) -> Result<RgbImage, EngineError> {
        let media = &mut *self.media;
        // Named by `in_field` below, as the decoder's own refusals are.
        vision::decode_rgb_with(data, &self.limits, |bytes| media.take(bytes, ""))
            .map_err(|e| e.in_field(field))
    }

    fn past_context(&self, tokens: u64) -> EngineError {
        EngineError::invalid(
            self.scope.clone(),
            format!(
                "the prompt reaches {tokens} tokens ({} of them image tokens) before its end; \
                 the context holds {}",
                u64::from(self.tiles) * u64::from(self.spec.tokens_per_tile),
                self.budget.max_tokens
            ),
        )
    }

    /// Tiles cut so far (what a request's later inputs have left).
    pub fn tiles(&self) -> u32 {
        self.tiles
    }

    fn flush_text(&mut self) -> Result<(), EngineError> {
        if self.text.is_empty() {
            return Ok(());
        }
        let first = self.pieces.is_empty();
        let tokens = self.model.tokenize(&self.text, first, true)?;
        self.text.clear();
        self.text_tokens = self
            .text_tokens
            .saturating_add(u32::try_from(tokens.len()).unwrap_or(u32::MAX));
        if self.tokens() > u64::from(self.budget.max_tokens) {
            return Err(self.past_context(self.tokens()));
        }
        self.pieces.push(Piece::Tokens(tokens));
        Ok(())
    }

    fn push_tiles(&mut self, tiled: TiledImage) -> Result<(), EngineError> {
        self.text.push_str(IMAGE_START);
        self.flush_text()?;
        self.tiles += tiled.tile_count();
        self.grids.push(ImageGrid {
            cols: tiled.cols,
            rows: tiled.rows,
            tiles: tiled.tile_count(),
        });
        self.pieces.push(Piece::Image(Arc::new(tiled)));
        self.text.push_str(IMAGE_END);
        Ok(())
    }

    /// Appends an image block: `<img>`, its tiles, `</img>`.
    pub fn push_image(&mut self, image: &ImageInput, field: &str) -> Result<(), EngineError> {
        let min = if image.min_tiles == 0 {
            self.spec.min_tiles
        } else {
            image.min_tiles
        };
        let max = if image.max_tiles == 0 {
            self.spec.max_tiles
        } else {
            image.max_tiles
        };
        if max > self.spec.max_tiles {
            // More tiles than the model was trained to take cost memory and
            // encoder time in proportion and help no answer.
            return Err(EngineError::invalid(
                format!("{field}.max_tiles"),
                format!(
                    "{max} is above this model's maximum of {} tiles",
                    self.spec.max_tiles
                ),
            ));
        }
        if min > max {
            return Err(EngineError::invalid(
                format!("{field}.min_tiles"),
                format!("min_tiles {min} is above max_tiles {max}"),
            ));
        }
        let rgb = self.decode(&image.data, &format!("{field}.data"))?;
        self.reserve_tiles(vision::tile_count(&rgb, &self.spec, min, max), field)?;
        let tiled = vision::tile_image(&rgb, &self.spec, min, max);
        self.push_tiles(tiled)
    }

    /// Appends a video: `Frame1: <img>…</img>\nFrame2: …`, one tile per sampled frame.
    pub fn push_video(&mut self, video: &VideoInput, field: &str) -> Result<(), EngineError> {
        let sampled: Vec<RgbImage>;
        let frames: &[RgbImage] = match &video.source {
            VideoSource::Frames(encoded) => {
                let indices = video
                    .sampling
                    .indices(encoded.len(), None, encoded.len(), field)?;
                self.reserve_tiles(indices.len() as u32, field)?;
                sampled = indices
                    .into_iter()
                    .map(|index| self.decode(&encoded[index], &format!("{field}.frames[{index}]")))
                    .collect::<Result<_, _>>()?;
                &sampled
            }
            VideoSource::Sampled(frames) => {
                self.reserve_tiles(frames.len() as u32, field)?;
                frames
            }
            VideoSource::File(_) => {
                return Err(EngineError::Fault(format!(
                    "{field}.data: a video file reached the engine undecoded"
                )))
            }
        };
        for (k, rgb) in frames.iter().enumerate() {
            if k > 0 {
                self.text.push('\n');
            }
            self.text.push_str(&format!("Frame{}: ", k + 1));
            self.push_tiles(vision::frame_tile(rgb, &self.spec))?;
        }
        Ok(())
    }

    /// Appends text as is.
    pub fn push_text(&mut self, text: &str) {
        self.text.push_str(text);
    }

    /// Finishes the prompt.
    pub fn finish(mut self) -> Result<Prompt, EngineError> {
        self.flush_text()?;
        let tiles: u32 = self.grids.iter().map(|g| g.tiles).sum();
        let image_tokens = tiles * self.spec.tokens_per_tile;
        Ok(Prompt {
            pieces: self.pieces,
            grids: self.grids,
            prompt_tokens: self.text_tokens + image_tokens,
            image_tokens,
        })
    }
}

/// Renders a conversation with the chat template and expands its media.
pub fn build_chat_prompt(
    model: &dyn TextTokenizer,
    template: &ChatTemplate,
    spec: TileSpec,
    limits: DecodeLimits,
    budget: PromptBudget,
    media: &mut MediaHold,
    messages: &[ChatMessage],
) -> Result<Prompt, EngineError> {
    for (mi, message) in messages.iter().enumerate() {
        for (pi, part) in message.parts.iter().enumerate() {
            if let Part::Text(text) = part {
                for marker in [IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER] {
                    if text.contains(marker) {
                        return Err(EngineError::invalid(
                            format!("messages[{mi}].content[{pi}].text"),
                            format!("contains {marker}, which is reserved for media parts; send an image or video part instead"),
                        ));
                    }
                }
            }
        }
    }
    let segments = template.render(messages)?;
    let parts: Vec<(usize, usize, &Part)> = messages
        .iter()
        .enumerate()
        .flat_map(|(mi, m)| m.parts.iter().enumerate().map(move |(pi, p)| (mi, pi, p)))
        .filter(|(_, _, p)| !matches!(p, Part::Text(_)))
        .collect();
    let mut builder = PromptBuilder::new(model, spec, limits, budget, media, "messages");
    let mut next_media = parts.iter();
    for segment in segments {
        match segment {
            Segment::Text(t) => builder.push_text(&t),
            Segment::Media(_) => {
                let (mi, pi, part) = next_media.next().expect("media counts were checked");
                let field = format!("messages[{mi}].content[{pi}]");
                match part {
                    Part::Image(image) => builder.push_image(image, &format!("{field}.image"))?,
                    Part::Video(video) => builder.push_video(video, &format!("{field}.video"))?,
                    Part::Text(_) => unreachable!("text parts are filtered out"),
                }
            }
        }
    }
    builder.finish()
}

/// Renders an embed input without chat template: parts in order, text as is,
/// each image as its block followed by a newline.
pub fn build_embed_prompt(
    model: &dyn TextTokenizer,
    spec: TileSpec,
    limits: DecodeLimits,
    budget: PromptBudget,
    media: &mut MediaHold,
    parts: &[Part],
    field: &str,
) -> Result<Prompt, EngineError> {
    let mut builder = PromptBuilder::new(model, spec, limits, budget, media, field);
    for (i, part) in parts.iter().enumerate() {
        match part {
            Part::Text(t) => builder.push_text(t),
            Part::Image(image) => {
                builder.push_image(image, &format!("{field}.content[{i}].image"))?;
                builder.push_text("\n");
            }
            Part::Video(video) => {
                builder.push_video(video, &format!("{field}.content[{i}].video"))?;
                builder.push_text("\n");
            }
        }
    }
    builder.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_split_in_order() {
        let s = split_placeholders("a<IMG_CONTEXT>\nb<video>\n");
        assert_eq!(
            s,
            vec![
                Segment::Text("a".into()),
                Segment::Media(MediaKind::Image),
                Segment::Text("\nb".into()),
                Segment::Media(MediaKind::Video),
                Segment::Text("\n".into()),
            ]
        );
    }
}
