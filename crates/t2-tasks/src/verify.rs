//! Verifiers: is a generated answer right? Each [`Answer`] kind has one, and [`verify`] picks it.
//!
//! **Numbers.** The final answer is, in order of preference: the last `\boxed{...}`, the last `#### X`, the
//! last "answer is X" / "Answer: X" (the first number after the phrase, on its line), else the last number in
//! the text. Both sides are normalised ([`normalize_number`]) and compared exactly as strings: thousands
//! separators, `$`, `%`, a leading `+`, a trailing period and trailing decimal zeros are ignored. Fractions
//! (`3/4`, `\frac{3}{4}`) are reduced; one whose denominator has only the factors 2 and 5 becomes its exact
//! decimal ("1/2" == "0.5"), others stay as "p/q" ("1/3" != "0.333"). There is no tolerance beyond that.
//!
//! **Choices by generation.** In order: the last `\boxed{...}` (a letter, or an option's text); the last
//! "answer is ..." / "Answer: ..." phrase (a letter right after it, else the first option mentioned on its
//! line); for lettered options, a response that starts with a letter ("B", "B.", "(B)", "B) ...", "B: ...")
//! and then a parenthesised letter "(B)" anywhere (the last one); finally the option text mentioned first
//! in the response (case-insensitive, whole words, the longest option when two start at the same place). A
//! hedge such as "positive or negative" therefore counts as its first mention, which earns no more than
//! chance; a response naming no option is wrong. A bare capital letter inside prose is not read as a choice,
//! because "A" is also an article.
//!
//! **Python.** [`extract_code`] takes the code out of the response, and the [`Sandbox`] runs it followed by
//! the hidden tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;

use regex::Regex;

use crate::data::Answer;
use crate::sandbox::{RunOutcome, Sandbox};

/// The result of checking one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub correct: bool,
    /// What was read from the response: a normalised number, a choice ("B" or the option text), or code.
    pub extracted: Option<String>,
    /// A short reason, e.g. "expected 42, got 41" or "test 2 failed: AssertionError".
    pub detail: String,
}

impl Verdict {
    fn new(correct: bool, extracted: Option<String>, detail: impl Into<String>) -> Verdict {
        Verdict {
            correct,
            extracted,
            detail: detail.into(),
        }
    }

    /// The RL reward: +1 when correct, -1 otherwise.
    pub fn reward(&self) -> f32 {
        if self.correct {
            1.0
        } else {
            -1.0
        }
    }
}

/// Checks one response against its answer.
pub fn verify(answer: &Answer, response: &str, sandbox: &Sandbox) -> Verdict {
    match answer {
        Answer::Number { value } => verify_number(value, response),
        Answer::Choice {
            options,
            correct,
            lettered,
        } => verify_choice(options, *correct, *lettered, response),
        Answer::Python { entry_point, tests } => {
            verify_python(entry_point, tests, response, sandbox)
        }
    }
}

/// Checks many responses; the Python ones run concurrently, at most the sandbox's `max_parallel` at once.
/// Verdicts come back in the order of `items`.
pub fn verify_all(items: &[(&Answer, &str)], sandbox: &Sandbox) -> Vec<Verdict> {
    let mut verdicts: Vec<Option<Verdict>> = vec![None; items.len()];
    let mut python = Vec::new();
    for (i, (answer, response)) in items.iter().enumerate() {
        if matches!(answer, Answer::Python { .. }) {
            python.push(i);
        } else {
            verdicts[i] = Some(verify(answer, response, sandbox));
        }
    }
    let workers = sandbox.config().max_parallel.min(python.len());
    if workers > 0 {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&i) = python.get(k) else { break };
                            let (answer, response) = items[i];
                            done.push((i, verify(answer, response, sandbox)));
                        }
                        done
                    })
                })
                .collect();
            for handle in handles {
                for (i, verdict) in handle.join().unwrap_or_default() {
                    verdicts[i] = Some(verdict);
                }
            }
        });
    }
    verdicts
        .into_iter()
        .map(|v| v.unwrap_or_else(|| Verdict::new(false, None, "the verifier thread panicked")))
        .collect()
}

/// The index of the highest score (the first one on ties); NaN never wins. Returns 0 for no scores.
pub fn choice_by_scores(scores: &[f32]) -> usize {
    let mut best: Option<(usize, f32)> = None;
    for (i, &s) in scores.iter().enumerate() {
        if s.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map_or(0, |(i, _)| i)
}

// ---------------------------------------------------------------------------------------------------------
// Numbers

/// A number token in free text: optional sign and `$`, digits with or without proper thousands groups, an
/// optional decimal part, an optional `/denominator`, an optional `%`.
static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"[-+−]?\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:\s?/\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)?%?",
    )
    .expect("number pattern")
});
static HASHES: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"####[ \t]*([^\n]*)").expect("#### pattern"));
static ANSWER_PHRASE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\banswer(?:\s+is\b|\s*[:=])[ \t]*:?[ \t]*([^\n]*)").expect("answer pattern")
});
static FRAC: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}").expect("frac pattern")
});
static TEXT_CMD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
        .expect("text pattern")
});

/// The model's final number, normalised (see the module docs for where it is looked for).
pub fn extract_number(text: &str) -> Option<String> {
    if let Some(content) = last_boxed(text) {
        if let Some(n) = first_number(&clean_latex(&content)) {
            return Some(n);
        }
    }
    if let Some(n) = HASHES
        .captures_iter(text)
        .last()
        .and_then(|c| first_number(&c[1]))
    {
        return Some(n);
    }
    if let Some(n) = ANSWER_PHRASE
        .captures_iter(text)
        .last()
        .and_then(|c| first_number(&clean_latex(&c[1])))
    {
        return Some(n);
    }
    numbers(text).last().cloned()
}

/// The canonical form of a number written by a person or a model: `-1,250.50` → `-1250.5`, `$3.50` →
/// `3.5`, `7.0` → `7`, `+5` → `5`, `50%` → `50`, `1/2` → `0.5`, `2/6` → `1/3`. None when `s` is not one
/// number.
pub fn normalize_number(s: &str) -> Option<String> {
    let s = clean_latex(s);
    let mut s = s.trim();
    s = s.strip_suffix('.').unwrap_or(s).trim_end();
    s = s.strip_suffix('%').unwrap_or(s).trim_end();
    let (negative, body) = match s.chars().next()? {
        '-' | '−' => (true, &s[s.chars().next()?.len_utf8()..]),
        '+' => (false, &s[1..]),
        _ => (false, s),
    };
    let body = body.trim_start();
    let body = body.strip_prefix('$').unwrap_or(body).trim_start();
    // "-$5" and "$-5" are both seen.
    let (negative, body) = match body.strip_prefix('-') {
        Some(rest) if !negative => (true, rest),
        _ => (negative, body),
    };
    let value = if let Some((num, den)) = body.split_once('/') {
        let num = parse_decimal(num.trim())?;
        let den = parse_decimal(den.trim())?;
        fraction_to_canonical(&num, &den)?
    } else {
        let d = parse_decimal(body)?;
        decimal_to_canonical(&d)
    };
    Some(if negative && value != "0" {
        format!("-{value}")
    } else {
        value
    })
}

fn verify_number(expected: &str, response: &str) -> Verdict {
    let Some(want) = normalize_number(expected) else {
        return Verdict::new(
            false,
            None,
            format!("the expected value '{expected}' is not a number"),
        );
    };
    match extract_number(response) {
        None => Verdict::new(false, None, "no number in the answer"),
        Some(got) if got == want => {
            Verdict::new(true, Some(got), format!("expected {want}, got it"))
        }
        Some(got) => {
            let detail = format!("expected {want}, got {got}");
            Verdict::new(false, Some(got), detail)
        }
    }
}

/// A decimal as written: digits before and after the point, without separators or sign.
struct Decimal {
    int: String,
    frac: String,
}

fn parse_decimal(s: &str) -> Option<Decimal> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let int = if int.contains(',') {
        let mut groups = int.split(',');
        let first = groups.next()?;
        let ok = (1..=3).contains(&first.len())
            && groups.clone().all(|g| g.len() == 3)
            && int.chars().all(|c| c.is_ascii_digit() || c == ',');
        if !ok {
            return None;
        }
        int.replace(',', "")
    } else {
        if !int.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        int.to_string()
    };
    Some(Decimal {
        int,
        frac: frac.to_string(),
    })
}

fn decimal_to_canonical(d: &Decimal) -> String {
    let int = d.int.trim_start_matches('0');
    let frac = d.frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    if frac.is_empty() {
        int.to_string()
    } else {
        format!("{int}.{frac}")
    }
}

/// num/den as an exact decimal when one exists, else reduced "p/q". None on division by zero or numbers
/// too long to reduce exactly.
fn fraction_to_canonical(num: &Decimal, den: &Decimal) -> Option<String> {
    // a.b / c.d = (ab * 10^|d|) / (cd * 10^|b|)
    let scale = |d: &Decimal, extra: usize| -> Option<u128> {
        let digits = format!("{}{}", d.int, d.frac);
        let mut v: u128 = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
        for _ in 0..extra {
            v = v.checked_mul(10)?;
        }
        Some(v)
    };
    let mut p = scale(num, den.frac.len())?;
    let mut q = scale(den, num.frac.len())?;
    if q == 0 {
        return None;
    }
    let g = gcd(p, q);
    p /= g;
    q /= g;
    let (mut twos, mut fives, mut rest) = (0u32, 0u32, q);
    while rest % 2 == 0 {
        rest /= 2;
        twos += 1;
    }
    while rest % 5 == 0 {
        rest /= 5;
        fives += 1;
    }
    if rest != 1 {
        return Some(format!("{p}/{q}"));
    }
    let k = twos.max(fives);
    // p/q = p * (10^k / q) / 10^k
    let scaled = p.checked_mul(10u128.checked_pow(k)? / q)?;
    let digits = format!("{scaled:0>width$}", width = k as usize + 1);
    let (int, frac) = digits.split_at(digits.len() - k as usize);
    Some(decimal_to_canonical(&Decimal {
        int: int.to_string(),
        frac: frac.to_string(),
    }))
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// Every number token in `text`, normalised, in order. A `-` or `+` glued to a preceding word or digit
/// ("3-5", "COVID-19") is a hyphen, not a sign.
fn numbers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for m in NUMBER.find_iter(text) {
        let mut token = m.as_str();
        let glued = text[..m.start()]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '.' || c == '_');
        if glued {
            if token.starts_with(['-', '+', '−']) {
                token = token.trim_start_matches(['-', '+', '−']).trim_start();
            } else {
                // The tail of something longer ("v2", "x3"): still a number, as people write "5th".
                if text[..m.start()].ends_with(|c: char| c.is_ascii_digit() || c == '.') {
                    continue;
                }
            }
        }
        if let Some(n) = normalize_number(token) {
            out.push(n);
        }
    }
    out
}

fn first_number(text: &str) -> Option<String> {
    numbers(text).into_iter().next()
}

/// The content of the last `\boxed{...}` (or `\fbox{...}`), braces balanced.
fn last_boxed(text: &str) -> Option<String> {
    let mut found = None;
    for pat in ["\\boxed", "\\fbox"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(pat) {
            let start = from + at;
            from = start + pat.len();
            let rest = text[from..].trim_start();
            let Some(inner) = rest.strip_prefix('{') else {
                continue;
            };
            let mut depth = 1usize;
            let mut end = None;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(i);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            if let Some(end) = end {
                if found.as_ref().is_none_or(|(s, _)| start > *s) {
                    found = Some((start, inner[..end].to_string()));
                }
            }
        }
    }
    found.map(|(_, content)| content)
}

/// Strips the LaTeX that wraps numbers: `\frac{a}{b}` → `a/b`, `\text{x}` → `x`, `\$`, `\%`, `{,}`, thin
/// spaces and math-mode dollars.
fn clean_latex(s: &str) -> String {
    let mut s = FRAC.replace_all(s, "$1/$2").into_owned();
    for _ in 0..3 {
        let next = TEXT_CMD.replace_all(&s, "$1").into_owned();
        if next == s {
            break;
        }
        s = next;
    }
    s.replace("\\$", "$")
        .replace("\\%", "%")
        .replace("{,}", ",")
        .replace("\\!", "")
        .replace("\\,", "")
        .replace("\\left", "")
        .replace("\\right", "")
}

// ---------------------------------------------------------------------------------------------------------
// Choices

static PAREN_LETTER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\(([A-Z])\)").expect("letter pattern"));

fn letter(i: usize) -> String {
    char::from(b'A' + (i % 26) as u8).to_string()
}

/// Names option `i` for details: "B (Venus)" when lettered.
fn option_name(options: &[String], i: usize, lettered: bool) -> String {
    match (lettered, options.get(i)) {
        (true, Some(text)) => format!("{} ({text})", letter(i)),
        (true, None) => letter(i),
        (false, Some(text)) => text.clone(),
        (false, None) => format!("option {i}"),
    }
}

/// Which option the response chose, by the rules in the module docs.
pub fn extract_choice(options: &[String], lettered: bool, response: &str) -> Option<usize> {
    let n = options.len().min(26);
    if let Some(content) = last_boxed(response) {
        let content = clean_latex(&content);
        if lettered {
            if let Some(i) = letter_at_start(&content, n, true) {
                return Some(i);
            }
        }
        if let Some(i) =
            exact_option(options, &content).or_else(|| first_mentioned(options, &content))
        {
            return Some(i);
        }
    }
    if let Some(c) = ANSWER_PHRASE.captures_iter(response).last() {
        let rest = &c[1];
        if lettered {
            let after_option = strip_prefix_ci(rest.trim_start(), "option")
                .or_else(|| strip_prefix_ci(rest.trim_start(), "choice"))
                .unwrap_or(rest);
            if let Some(i) = letter_at_start(after_option, n, false) {
                return Some(i);
            }
        }
        if let Some(i) = first_mentioned(options, rest) {
            return Some(i);
        }
    }
    if lettered {
        if let Some(i) = letter_at_start(response, n, false) {
            return Some(i);
        }
        if let Some(i) = PAREN_LETTER
            .captures_iter(response)
            .filter_map(|c| letter_index(&c[1], n))
            .last()
        {
            return Some(i);
        }
    }
    exact_option(options, response).or_else(|| first_mentioned(options, response))
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn letter_index(s: &str, n: usize) -> Option<usize> {
    let mut chars = s.chars();
    let c = chars.next()?;
    if chars.next().is_some() || !c.is_ascii_uppercase() {
        return None;
    }
    let i = (c as u8 - b'A') as usize;
    (i < n).then_some(i)
}

/// A letter opening `s`: "B", "B.", "B)", "B:", "B,", "(B)", "[B]", optionally in markdown emphasis. With
/// `alone`, the whole of `s` must be that letter (inside a box nothing else is expected).
fn letter_at_start(s: &str, n: usize, alone: bool) -> Option<usize> {
    let s = s.trim().trim_start_matches(['*', '_', '`']).trim_start();
    let (inner, after) = if let Some(rest) = s.strip_prefix('(').or_else(|| s.strip_prefix('[')) {
        let close = rest.find([')', ']'])?;
        (rest[..close].trim(), &rest[close + 1..])
    } else {
        let end = s.char_indices().nth(1).map_or(s.len(), |(i, _)| i);
        let (head, tail) = s.split_at(end);
        if !tail.is_empty() && !tail.starts_with(['.', ')', ':', ',', '*', '_', '`']) && !alone {
            return None;
        }
        (head, tail)
    };
    let i = letter_index(inner, n)?;
    if alone {
        let rest = after.trim().trim_matches(['.', '*', '_', '`', ')']);
        if !rest.is_empty() {
            return None;
        }
    }
    Some(i)
}

fn simplify(s: &str) -> String {
    s.trim()
        .trim_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace())
        .to_ascii_lowercase()
}

/// The option whose whole text is `s` (ignoring case and surrounding punctuation).
fn exact_option(options: &[String], s: &str) -> Option<usize> {
    let s = simplify(s);
    if s.is_empty() {
        return None;
    }
    options.iter().position(|o| simplify(o) == s)
}

/// The option mentioned first in `text` as a whole phrase, ignoring ASCII case; the longest one when two
/// start at the same place.
fn first_mentioned(options: &[String], text: &str) -> Option<usize> {
    let hay = text.to_ascii_lowercase();
    // (start, length, option index)
    let mut best: Option<(usize, usize, usize)> = None;
    for (i, option) in options.iter().enumerate() {
        let needle = option.trim().to_ascii_lowercase();
        if needle.is_empty() {
            continue;
        }
        let mut from = 0;
        while let Some(at) = hay[from..].find(&needle) {
            let start = from + at;
            let end = start + needle.len();
            let before_ok = !hay[..start].chars().next_back().is_some_and(is_word_char)
                || !needle.starts_with(is_word_char);
            let after_ok = !hay[end..].chars().next().is_some_and(is_word_char)
                || !needle.ends_with(is_word_char);
            if before_ok && after_ok {
                let better = match best {
                    None => true,
                    Some((pos, len, _)) => start < pos || (start == pos && needle.len() > len),
                };
                if better {
                    best = Some((start, needle.len(), i));
                }
                break;
            }
            from = start + needle.chars().next().map_or(1, char::len_utf8);
        }
    }
    best.map(|(_, _, i)| i)
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn verify_choice(options: &[String], correct: usize, lettered: bool, response: &str) -> Verdict {
    if correct >= options.len() {
        return Verdict::new(
            false,
            None,
            format!(
                "the expected option {correct} is out of range ({} options)",
                options.len()
            ),
        );
    }
    let want = option_name(options, correct, lettered);
    match extract_choice(options, lettered, response) {
        None => Verdict::new(
            false,
            None,
            format!("no option found in the answer (expected {want})"),
        ),
        Some(i) => {
            let got = option_name(options, i, lettered);
            let extracted = Some(if lettered {
                letter(i)
            } else {
                options[i].clone()
            });
            if i == correct {
                Verdict::new(true, extracted, format!("expected {want}, got it"))
            } else {
                Verdict::new(false, extracted, format!("expected {want}, got {got}"))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Python

/// The code in a response: the first ```python block that defines something (else the first ```python
/// block), else the first ``` block of any language, else the text from the first line starting with
/// `def`, `import`, `from`, `class` or `@`, else the whole text. An unclosed fence runs to the end.
pub fn extract_code(text: &str) -> String {
    let blocks = fenced_blocks(text);
    let is_python = |lang: &str| {
        let lang = lang.to_ascii_lowercase();
        lang == "python" || lang == "py" || lang == "python3"
    };
    let python: Vec<&(String, String)> =
        blocks.iter().filter(|(lang, _)| is_python(lang)).collect();
    if let Some((_, code)) = python
        .iter()
        .find(|(_, code)| {
            code.lines()
                .any(|l| l.starts_with("def ") || l.starts_with("class "))
        })
        .or(python.first())
    {
        return code.clone();
    }
    if let Some((_, code)) = blocks.first() {
        return code.clone();
    }
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if ["def ", "import ", "from ", "class ", "@"]
            .iter()
            .any(|p| t.starts_with(p))
            && line.len() == t.len()
        {
            return text[offset..].to_string();
        }
        offset += line.len();
    }
    text.to_string()
}

/// (language, code) of every fenced block.
fn fenced_blocks(text: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        match current.as_mut() {
            None => {
                if let Some(lang) = t.strip_prefix("```") {
                    current = Some((lang.trim().to_string(), String::new()));
                }
            }
            Some((_, code)) => {
                if t == "```"
                    || (t.starts_with("```") && t.trim_start_matches('`').trim().is_empty())
                {
                    blocks.push(current.take().expect("inside a block"));
                } else {
                    code.push_str(line);
                }
            }
        }
    }
    if let Some(block) = current {
        blocks.push(block);
    }
    blocks
}

fn verify_python(
    entry_point: &str,
    tests: &[String],
    response: &str,
    sandbox: &Sandbox,
) -> Verdict {
    let code = extract_code(response);
    if code.trim().is_empty() {
        return Verdict::new(false, None, "no code in the answer");
    }
    let outcome = sandbox.run_tests(&code, tests);
    let detail = match &outcome {
        RunOutcome::Passed => format!("{entry_point}: all {} tests passed", tests.len()),
        other => other.summary(),
    };
    Verdict::new(outcome.passed(), Some(code), detail)
}
