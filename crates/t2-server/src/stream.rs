//! Streamed answers: OpenAI's chunk objects as server-sent events, ending with `[DONE]`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;

use crate::infer::{Generation, InferEvent};
use crate::openai::*;
use crate::render::{chat_logprobs, new_id, now_secs, text_logprobs, FINGERPRINT};
use crate::request::Kind;
use crate::state::{AppState, Core};

/// Builds the SSE chunks of one request.
struct Chunker {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    include_usage: bool,
    want_logprobs: bool,
    info: AdaptationInfo,
    /// Per choice: bytes of text sent so far (text completions' logprob offsets).
    sent: Vec<usize>,
}

impl Chunker {
    fn event<T: serde::Serialize>(v: &T) -> Event {
        Event::default().data(serde_json::to_string(v).expect("chunks serialize"))
    }

    fn usage_field(&self, usage: Option<Usage>) -> Option<Option<Usage>> {
        self.include_usage.then_some(usage)
    }

    fn chat(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> Event {
        Self::event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.usage_field(usage),
            system_fingerprint: FINGERPRINT.into(),
            adaptation: self.info.clone(),
        })
    }

    fn text(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Event {
        Self::event(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.usage_field(usage),
            system_fingerprint: FINGERPRINT.into(),
            adaptation: self.info.clone(),
        })
    }

    /// The first chunk of every chat choice carries the role.
    fn opening(&self, n: usize) -> Vec<Event> {
        if self.kind != Kind::Chat {
            return Vec::new();
        }
        (0..n)
            .map(|i| {
                self.chat(
                    vec![ChatChunkChoice {
                        index: i,
                        delta: Delta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                        },
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                )
            })
            .collect()
    }

    /// Chunks for one token event: its text (if any) and, when it ends the choice, the finish.
    fn token(&mut self, core: &Core, i: usize, ev: &t2_engine::TokenEvent) -> Vec<Event> {
        let mut out = Vec::new();
        let lp = ev
            .logprob
            .as_ref()
            .filter(|_| self.want_logprobs && ev.counted)
            .cloned();
        if !ev.text.is_empty() || lp.is_some() {
            out.push(match self.kind {
                Kind::Chat => self.chat(
                    vec![ChatChunkChoice {
                        index: i,
                        delta: Delta {
                            role: None,
                            content: Some(ev.text.clone()),
                        },
                        logprobs: lp.map(|l| ChatLogprobs {
                            content: chat_logprobs(core, std::slice::from_ref(&l)),
                        }),
                        finish_reason: None,
                    }],
                    None,
                ),
                Kind::Text => self.text(
                    vec![CompletionChoice {
                        index: i,
                        text: ev.text.clone(),
                        logprobs: lp
                            .map(|l| text_logprobs(core, std::slice::from_ref(&l), self.sent[i])),
                        finish_reason: None,
                    }],
                    None,
                ),
            });
            self.sent[i] += ev.text.len();
        }
        if let Some(f) = ev.finish {
            out.push(match self.kind {
                Kind::Chat => self.chat(
                    vec![ChatChunkChoice {
                        index: i,
                        delta: Delta::default(),
                        logprobs: None,
                        finish_reason: Some(f.as_str()),
                    }],
                    None,
                ),
                Kind::Text => self.text(
                    vec![CompletionChoice {
                        index: i,
                        text: String::new(),
                        logprobs: None,
                        finish_reason: Some(f.as_str()),
                    }],
                    None,
                ),
            });
        }
        out
    }

    fn closing(&self, usage: Usage) -> Vec<Event> {
        let mut out = Vec::new();
        if self.include_usage {
            out.push(match self.kind {
                Kind::Chat => self.chat(Vec::new(), Some(usage)),
                Kind::Text => self.text(Vec::new(), Some(usage)),
            });
        }
        out.push(Event::default().data("[DONE]"));
        out
    }
}

/// The answer as server-sent events, fed by a task that stops (cancelling the sequences, by dropping the
/// generation) as soon as the client goes away.
pub fn sse(
    state: Arc<AppState>,
    mut g: Generation,
    kind: Kind,
    model: String,
) -> impl IntoResponse {
    let n = g.n();
    let mut chunker = Chunker {
        id: new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: now_secs(),
        model,
        kind,
        include_usage: g.include_usage,
        want_logprobs: g.want_logprobs,
        info: g.chosen.info.clone(),
        sent: vec![0; n],
    };
    // Bounded: a slow reader makes this task wait, never the model thread (its channels hold whole answers).
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let core = state.core_if_loaded().expect("loaded");
        let send_all = |tx: &tokio::sync::mpsc::Sender<Event>, evs: Vec<Event>| {
            let tx = tx.clone();
            async move {
                for e in evs {
                    if tx.send(e).await.is_err() {
                        return false;
                    }
                }
                true
            }
        };
        if !send_all(&tx, chunker.opening(n)).await {
            return;
        }
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return, // client gone: dropping `g` cancels the sequences
                e = g.next() => e,
            };
            match next {
                InferEvent::Token { choice, event } => {
                    if !send_all(&tx, chunker.token(core, choice, &event)).await {
                        return;
                    }
                }
                InferEvent::Done => break,
                InferEvent::Error(e) => {
                    let _ = tx.send(Chunker::event(&e.body())).await;
                    return;
                }
            }
        }
        send_all(&tx, chunker.closing(g.usage())).await;
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(body)
}
