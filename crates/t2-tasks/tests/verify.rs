//! The verifiers: numbers, choices and Python (run for real in the sandbox).

use std::sync::OnceLock;

use t2_tasks::sandbox::{Sandbox, SandboxConfig};
use t2_tasks::verify::{
    choice_by_scores, extract_choice, extract_code, extract_number, normalize_number, verify,
    verify_all,
};
use t2_tasks::Answer;

fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| Sandbox::new(SandboxConfig::default()).expect("python3 sandbox"))
}

fn number(value: &str) -> Answer {
    Answer::Number {
        value: value.into(),
    }
}

fn choice(options: &[&str], correct: usize, lettered: bool) -> Answer {
    Answer::Choice {
        options: options.iter().map(|s| s.to_string()).collect(),
        correct,
        lettered,
    }
}

fn python(entry_point: &str, tests: &[&str]) -> Answer {
    Answer::Python {
        entry_point: entry_point.into(),
        tests: tests.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn normalizes_numbers() {
    let cases = [
        ("42", Some("42")),
        ("1,250", Some("1250")),
        ("1,250.", Some("1250")),
        ("$3.50", Some("3.5")),
        ("-$3.50", Some("-3.5")),
        ("$-3.50", Some("-3.5")),
        ("7.0", Some("7")),
        ("+5", Some("5")),
        ("50%", Some("50")),
        ("0.50", Some("0.5")),
        (".5", Some("0.5")),
        ("007", Some("7")),
        ("-0", Some("0")),
        ("-0.0", Some("0")),
        ("−12", Some("-12")),
        ("1/2", Some("0.5")),
        ("-3/4", Some("-0.75")),
        ("2/6", Some("1/3")),
        ("10/5", Some("2")),
        ("\\frac{3}{4}", Some("0.75")),
        ("\\dfrac{1}{3}", Some("1/3")),
        ("1{,}000", Some("1000")),
        ("\\$18", Some("18")),
        ("1,25", None),
        ("abc", None),
        ("", None),
        ("1/0", None),
        ("3 apples", None),
    ];
    for (input, want) in cases {
        assert_eq!(
            normalize_number(input).as_deref(),
            want,
            "normalize_number({input:?})"
        );
    }
}

#[test]
fn extracts_the_final_number() {
    let cases = [
        (
            "So the total is \\boxed{1,250}. Earlier I had 17.",
            Some("1250"),
        ),
        (
            "First \\boxed{3}, then corrected: \\boxed{\\frac{1}{2}}",
            Some("0.5"),
        ),
        ("\\boxed{x = -4}", Some("-4")),
        ("She pays 3 * 4 = 12 dollars.\n#### 12", Some("12")),
        ("#### 1,000\nThat's 7 more than before", Some("1000")),
        ("The answer is 1,250.", Some("1250")),
        ("Answer: $3.50 per cup, for 2 cups", Some("3.5")),
        ("So the final answer is: -17", Some("-17")),
        ("Total 5 apples + 7 apples = 12 apples", Some("12")),
        ("It dropped to -8 degrees", Some("-8")),
        ("pages 3-5", Some("5")),
        ("The price rose 12.5%.", Some("12.5")),
        ("I don't know.", None),
        ("", None),
    ];
    for (text, want) in cases {
        assert_eq!(
            extract_number(text).as_deref(),
            want,
            "extract_number({text:?})"
        );
    }
}

#[test]
fn number_verdicts() {
    let sb = sandbox();
    let v = verify(&number("42"), "6 * 7 = 42, so \\boxed{42}", sb);
    assert!(v.correct, "{v:?}");
    assert_eq!(v.extracted.as_deref(), Some("42"));
    assert_eq!(v.reward(), 1.0);

    let v = verify(&number("42"), "The answer is 41.", sb);
    assert!(!v.correct);
    assert_eq!(v.detail, "expected 42, got 41");
    assert_eq!(v.reward(), -1.0);

    let v = verify(&number("3.5"), "It costs $3.50", sb);
    assert!(v.correct, "{v:?}");
    let v = verify(&number("1250"), "#### 1,250", sb);
    assert!(v.correct, "{v:?}");
    let v = verify(&number("-5"), "The temperature is -5.", sb);
    assert!(v.correct, "{v:?}");
    // No tolerance: 3.49 is not 3.5.
    assert!(!verify(&number("3.5"), "3.49", sb).correct);

    let v = verify(&number("7"), "no idea", sb);
    assert!(!v.correct);
    assert_eq!(v.extracted, None);
    assert_eq!(v.detail, "no number in the answer");
}

#[test]
fn lettered_choices() {
    let sb = sandbox();
    let opts = ["Mercury", "Venus", "Earth", "Mars"];
    let a = choice(&opts, 1, true);
    for good in [
        "\\boxed{B}",
        "B",
        "B.",
        "(B)",
        "B) Venus",
        "**B**",
        "The answer is B",
        "The answer is (B).",
        "Answer: B",
        "Venus",
        "venus.",
        "The closest is Venus, because Mercury is further on average.",
        "I'd pick (B) since it's closest.",
        "\\boxed{\\text{Venus}}",
    ] {
        let v = verify(&a, good, sb);
        assert!(v.correct, "{good:?}: {v:?}");
    }
    for (bad, got) in [
        ("\\boxed{C}", Some("C")),
        ("C", Some("C")),
        ("The answer is A.", Some("A")),
        ("Mars", Some("D")),
        // The box is the final word even when the reasoning mentioned B.
        ("B looks tempting, but \\boxed{D}", Some("D")),
        // A letter out of range is not a choice.
        ("(E)", None),
        // "A" as an article is not the letter A: no option here at all.
        ("A planet, I think", None),
        ("I have no idea", None),
    ] {
        let v = verify(&a, bad, sb);
        assert!(!v.correct, "{bad:?}: {v:?}");
        assert_eq!(v.extracted.as_deref(), got, "{bad:?}");
    }
    let v = verify(&a, "C", sb);
    assert_eq!(v.detail, "expected B (Venus), got C (Earth)");
    let v = verify(&a, "pass", sb);
    assert!(v.detail.starts_with("no option found"), "{}", v.detail);
}

#[test]
fn unlettered_labels() {
    let sb = sandbox();
    let sentiment = choice(&["negative", "positive"], 1, false);
    assert!(verify(&sentiment, "positive", sb).correct);
    assert!(verify(&sentiment, "Positive.", sb).correct);
    assert!(verify(&sentiment, "The sentiment of this review is POSITIVE", sb).correct);
    assert!(verify(&sentiment, "\\boxed{positive}", sb).correct);
    assert!(
        verify(
            &sentiment,
            "Hmm, negative words, but overall the answer is positive",
            sb
        )
        .correct
    );
    assert!(!verify(&sentiment, "negative", sb).correct);
    // Whole words only: "positively" / "nonnegative" are not labels.
    let v = verify(&sentiment, "It is positively ambiguous", sb);
    assert!(!v.correct);
    assert_eq!(v.extracted, None);
    // A hedge counts as its first mention.
    assert_eq!(
        verify(&sentiment, "positive or negative", sb)
            .extracted
            .as_deref(),
        Some("positive")
    );
    assert!(!verify(&sentiment, "negative or positive", sb).correct);
    let v = verify(&sentiment, "neutral", sb);
    assert!(!v.correct);
    assert!(v.detail.contains("no option found"), "{}", v.detail);

    let labels = ["code", "math", "reasoning", "classification"];
    let route = choice(&labels, 1, false);
    assert!(verify(&route, "math", sb).correct);
    assert!(verify(&route, "Category: math", sb).correct);
    assert!(!verify(&route, "This is a code question", sb).correct);
    assert!(!verify(&route, "mathematics", sb).correct);

    let owned: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        extract_choice(&owned, false, "reasoning, not math"),
        Some(2)
    );
    // The longest option wins when two start at the same place.
    let nested: Vec<String> = ["very positive", "positive"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(extract_choice(&nested, false, "very positive!"), Some(0));
}

#[test]
fn choice_by_scores_is_argmax_first_on_ties() {
    assert_eq!(choice_by_scores(&[-3.0, -1.0, -2.0]), 1);
    assert_eq!(choice_by_scores(&[0.5, 0.9, 0.9]), 1);
    assert_eq!(choice_by_scores(&[f32::NAN, -5.0]), 1);
    assert_eq!(choice_by_scores(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    assert_eq!(choice_by_scores(&[]), 0);
}

#[test]
fn extracts_code() {
    let text = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nUsage:\n```python\nprint(add(1, 2))\n```";
    assert_eq!(extract_code(text), "def add(a, b):\n    return a + b\n");
    // A usage block first: the block that defines something is the solution.
    let text = "```python\nprint(add(1, 2))\n```\n```python\ndef add(a, b):\n    return a + b\n```";
    assert_eq!(extract_code(text), "def add(a, b):\n    return a + b\n");
    assert_eq!(extract_code("```\nx = 1\n```"), "x = 1\n");
    assert_eq!(extract_code("```py\nx = 2\n"), "x = 2\n");
    assert_eq!(
        extract_code("Sure! The function:\nimport math\ndef f(x):\n    return math.sqrt(x)"),
        "import math\ndef f(x):\n    return math.sqrt(x)"
    );
    assert_eq!(extract_code("x = 3"), "x = 3");
}

#[test]
fn python_verdicts() {
    let sb = sandbox();
    let a = python(
        "add",
        &[
            "assert add(1, 2) == 3",
            "assert add(-1, 1) == 0",
            "assert add(2, 2) == 4",
        ],
    );

    let v = verify(&a, "```python\ndef add(a, b):\n    return a + b\n```", sb);
    assert!(v.correct, "{v:?}");
    assert_eq!(v.detail, "add: all 3 tests passed");
    assert_eq!(
        v.extracted.as_deref(),
        Some("def add(a, b):\n    return a + b\n")
    );

    // Right on test 1 only.
    let v = verify(&a, "def add(a, b):\n    return 3", sb);
    assert!(!v.correct);
    assert!(
        v.detail.starts_with("test 2 failed: AssertionError"),
        "{}",
        v.detail
    );
    assert!(v.detail.contains("assert add(-1, 1) == 0"), "{}", v.detail);

    let v = verify(&a, "```python\ndef add(a, b)\n    return a + b\n```", sb);
    assert!(!v.correct);
    assert!(
        v.detail.contains("does not compile: SyntaxError"),
        "{}",
        v.detail
    );

    let v = verify(&a, "```python\ndef plus(a, b):\n    return a + b\n```", sb);
    assert!(!v.correct);
    assert!(v.detail.contains("NameError"), "{}", v.detail);

    let b = python("check", &["assert check() == 1, 'check() must be 1'"]);
    let v = verify(&b, "def check():\n    return 2", sb);
    assert!(
        v.detail.contains("AssertionError: check() must be 1"),
        "{}",
        v.detail
    );

    let v = verify(&b, "def check():\n    while True:\n        pass", sb);
    assert!(!v.correct);
    assert_eq!(v.detail, "timed out after 5 s");

    let v = verify(&b, "", sb);
    assert!(!v.correct);
    assert_eq!(v.detail, "no code in the answer");
}

#[test]
fn verify_all_keeps_order_and_runs_python_concurrently() {
    let sb = sandbox();
    let add = python("add", &["assert add(2, 3) == 5"]);
    let n = number("5");
    let c = choice(&["no", "yes"], 1, false);
    let good = "```python\nimport time\ndef add(a, b):\n    time.sleep(0.2)\n    return a + b\n```";
    let bad = "def add(a, b):\n    return a - b";
    let mut items: Vec<(&Answer, &str)> = Vec::new();
    for i in 0..12 {
        match i % 4 {
            0 => items.push((&add, good)),
            1 => items.push((&add, bad)),
            2 => items.push((&n, "#### 5")),
            _ => items.push((&c, "no")),
        }
    }
    let verdicts = verify_all(&items, sb);
    assert_eq!(verdicts.len(), items.len());
    for (i, v) in verdicts.iter().enumerate() {
        let want = matches!(i % 4, 0 | 2);
        assert_eq!(v.correct, want, "item {i}: {v:?}");
    }
    assert!(
        verdicts[1].detail.starts_with("test 1 failed"),
        "{}",
        verdicts[1].detail
    );
    assert!(verify_all(&[], sb).is_empty());
}
