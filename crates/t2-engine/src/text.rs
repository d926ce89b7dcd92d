//! Incremental detokenization with stop strings: text is released only once no stop string can still
//! begin in it and no multi-byte character is cut in half.

pub struct TextStream {
    stops: Vec<String>,
    text: String,
    released: usize,
}

/// What a step of decoding released, and whether a stop string ended the text.
pub struct Released {
    pub delta: String,
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            released: 0,
        }
    }

    /// `full` is the decoding of all tokens so far.
    pub fn update(&mut self, full: String) -> Released {
        self.text = full;
        if let Some(cut) = self.first_stop() {
            let delta = self.text[self.released.min(cut)..cut].to_string();
            self.text.truncate(cut);
            self.released = cut;
            return Released {
                delta,
                stopped: true,
            };
        }
        let mut safe = self.text.len();
        // An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives.
        if self.text.ends_with('\u{FFFD}') {
            safe -= '\u{FFFD}'.len_utf8();
        }
        // Hold back a suffix that could be the start of a stop string.
        let mut hold = 0;
        for stop in &self.stops {
            if let Some(k) = (1..stop.len())
                .rev()
                .find(|&k| stop.is_char_boundary(k) && self.text[..safe].ends_with(&stop[..k]))
            {
                hold = hold.max(k);
            }
        }
        let safe = safe - hold;
        let safe = safe.max(self.released);
        let delta = self.text[self.released..safe].to_string();
        self.released = safe;
        Released {
            delta,
            stopped: false,
        }
    }

    /// Whatever was held back, at the end of generation.
    pub fn flush(&mut self) -> String {
        let delta = self.text[self.released..].to_string();
        self.released = self.text.len();
        delta
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    fn first_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_cuts_text_and_never_leaks() {
        let mut t = TextStream::new(vec!["END".into()]);
        let mut out = String::new();
        for full in ["Hello", "Hello E", "Hello EN", "Hello END and more"] {
            let r = t.update(full.to_string());
            out.push_str(&r.delta);
            if r.stopped {
                break;
            }
        }
        assert_eq!(out, "Hello ");
        assert_eq!(t.text(), "Hello ");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_is_not_a_stop() {
        let mut t = TextStream::new(vec!["END".into()]);
        assert_eq!(t.update("ab E".into()).delta, "ab ");
        assert_eq!(t.update("ab Ex".into()).delta, "Ex");
        assert_eq!(t.update("ab ExE".into()).delta, "");
        assert_eq!(t.flush(), "E");
    }

    #[test]
    fn incomplete_characters_are_held_back() {
        let mut t = TextStream::new(vec![]);
        assert_eq!(t.update("a\u{FFFD}".into()).delta, "a");
        assert_eq!(t.update("aé".into()).delta, "é");
    }
}
