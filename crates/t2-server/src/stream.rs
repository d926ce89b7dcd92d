//! Streamed answers: OpenAI's chunk objects as server-sent events, ending with `[DONE]`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;

use crate::infer::{Generation, InferEvent};
use crate::openai::*;
use t2_structured::tools::{CallStream, Piece};

use crate::render::{
    chat_logprobs, finish_reason, new_id, now_secs, text_logprobs, tool_call, FINGERPRINT,
};
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
    /// Per choice, where tools were offered: the answer split into text and calls as it streams.
    calls: Option<Vec<CallStream>>,
    /// Per choice: calls sent so far.
    calls_sent: Vec<usize>,
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
                            tool_calls: None,
                        },
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                )
            })
            .collect()
    }

    /// A chat chunk with one choice's delta.
    fn chat_delta(&self, i: usize, delta: Delta, logprobs: Option<ChatLogprobs>) -> Event {
        self.chat(
            vec![ChatChunkChoice {
                index: i,
                delta,
                logprobs,
                finish_reason: None,
            }],
            None,
        )
    }

    /// Where tools were offered: text and calls out of a piece of choice `i`'s answer (None: the answer's
    /// end). Calls become tool-call deltas, each call whole in one delta.
    fn split_calls(&mut self, i: usize, text: Option<&str>) -> (String, Vec<ToolCallDelta>) {
        let Some(streams) = &mut self.calls else {
            return (text.unwrap_or_default().to_string(), Vec::new());
        };
        let pieces = match text {
            Some(t) => streams[i].feed(t),
            None => streams[i].finish(),
        };
        let (mut content, mut calls) = (String::new(), Vec::new());
        for p in pieces {
            match p {
                Piece::Text(t) => content.push_str(&t),
                Piece::Call(c) => {
                    let call = tool_call(c);
                    calls.push(ToolCallDelta {
                        index: self.calls_sent[i],
                        id: call.id,
                        kind: "function",
                        function: call.function,
                    });
                    self.calls_sent[i] += 1;
                }
            }
        }
        (content, calls)
    }

    /// Chunks of text and calls for choice `i`.
    fn content_chunks(
        &self,
        i: usize,
        text: String,
        calls: Vec<ToolCallDelta>,
        lp: Option<ChatLogprobs>,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        if !text.is_empty() || lp.is_some() {
            out.push(self.chat_delta(
                i,
                Delta {
                    content: Some(text),
                    ..Delta::default()
                },
                lp,
            ));
        }
        if !calls.is_empty() {
            out.push(self.chat_delta(
                i,
                Delta {
                    tool_calls: Some(calls),
                    ..Delta::default()
                },
                None,
            ));
        }
        out
    }

    /// Chunks for one token event: its text (if any) and, when it ends the choice, the finish.
    fn token(&mut self, core: &Core, i: usize, ev: &t2_engine::TokenEvent) -> Vec<Event> {
        let mut out = Vec::new();
        let lp = ev
            .logprob
            .as_ref()
            .filter(|_| self.want_logprobs && ev.counted)
            .cloned();
        if self.kind == Kind::Chat {
            let (text, calls) = self.split_calls(i, Some(&ev.text));
            let lp = lp.map(|l| ChatLogprobs {
                content: chat_logprobs(core, std::slice::from_ref(&l)),
            });
            out.extend(self.content_chunks(i, text, calls, lp));
            if let Some(f) = ev.finish {
                let (text, calls) = self.split_calls(i, None);
                out.extend(self.content_chunks(i, text, calls, None));
                out.push(self.chat(
                    vec![ChatChunkChoice {
                        index: i,
                        delta: Delta::default(),
                        logprobs: None,
                        finish_reason: Some(finish_reason(f, self.calls_sent[i])),
                    }],
                    None,
                ));
            }
            return out;
        }
        if !ev.text.is_empty() || lp.is_some() {
            out.push(self.text(
                vec![CompletionChoice {
                    index: i,
                    text: ev.text.clone(),
                    logprobs:
                        lp.map(|l| text_logprobs(core, std::slice::from_ref(&l), self.sent[i])),
                    finish_reason: None,
                }],
                None,
            ));
            self.sent[i] += ev.text.len();
        }
        if let Some(f) = ev.finish {
            out.push(self.text(
                vec![CompletionChoice {
                    index: i,
                    text: String::new(),
                    logprobs: None,
                    finish_reason: Some(f.as_str()),
                }],
                None,
            ));
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
        calls: g
            .tool_format
            .map(|f| (0..n).map(|_| CallStream::new(f)).collect()),
        calls_sent: vec![0; n],
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
