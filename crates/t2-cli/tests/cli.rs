//! The `t2` binary on the real model: it works, and every kind of bad input gives one clear line on
//! stderr, a non-zero exit and no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use t2_model::LoadedModel;
use t2_svf::{Decomposition, Expert, ExpertMeta, ExpertStore, TargetSet};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> PathBuf {
    let p = repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "run `bash scripts/fetch-model.sh` first");
    p
}

fn t2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_t2"))
        .args(args)
        .env_remove("T2_MODEL")
        .env_remove("T2_EXPERTS")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Fails unless the command failed cleanly: non-zero exit, a single `error:` line, no panic.
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        matches!(o.status.code(), Some(1) | Some(2)),
        "stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "'{needle}' not in: {err}"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn generate_streams_a_reply() {
    let o = t2(&[
        "generate",
        "--model",
        s(&model()),
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "12",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Paris"), "unexpected reply: {out}");
    assert!(
        stderr(&o).contains("generated"),
        "summary line missing: {}",
        stderr(&o)
    );
}

#[test]
fn missing_model_says_how_to_fetch_it() {
    let o = t2(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert_clean_failure(&o, "fetch-model.sh");
}

#[test]
fn truncated_or_garbage_gguf_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(model()).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    assert_clean_failure(
        &t2(&["generate", "--model", s(&cut), "--prompt", "hi"]),
        "truncated",
    );
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model at all").unwrap();
    assert_clean_failure(
        &t2(&["generate", "--model", s(&junk), "--prompt", "hi"]),
        "not a valid GGUF",
    );
}

#[test]
fn bad_arguments_are_refused() {
    let m = model();
    for (extra, needle) in [
        (&["--temperature=-1"][..], "temperature"),
        (&["--device", "tpu"], "unknown device"),
        (&["--mix", "math=abc"], "not a number"),
        (&["--max-tokens", "9000"], "context"),
        (
            &["--cache-dtype", "f8"],
            "unknown cache dtype 'f8' (expected f32 or bf16)",
        ),
    ] {
        let mut args = vec!["generate", "--model", s(&m), "--prompt", "hi"];
        args.extend_from_slice(extra);
        assert_clean_failure(&t2(&args), needle);
    }
}

/// An expert store for the default model in a temp dir, holding `experts`.
fn store_with(experts: Vec<Expert>) -> (tempfile::TempDir, Decomposition) {
    // one thread at a time: the first may have to build the decomposition cache
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let loaded = LoadedModel::load(&model(), &Device::Cpu, DType::F32).unwrap();
    let (d, _) = Decomposition::load_or_compute(
        &model(),
        &loaded.model,
        &loaded.weights_sha256,
        TargetSet::All,
        false,
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut store = ExpertStore::open(root.path(), &loaded.model_id, &d).unwrap();
    for e in experts {
        store.add(e, &d).unwrap();
    }
    (root, d)
}

fn meta(d: &Decomposition, name: &str) -> ExpertMeta {
    ExpertMeta {
        name: name.into(),
        description: "test expert".into(),
        category: "math".into(),
        model_id: "SmolLM2-135M-Instruct".into(),
        decomposition_hash: d.hash.clone(),
        targets: TargetSet::All,
        provenance: Default::default(),
    }
}

#[test]
fn experts_unknown_foreign_and_nan_are_refused_and_a_constant_expert_is_the_base_model() {
    let (root, d) = store_with(vec![]);
    let m = model();
    let experts = s(root.path()).to_string();
    // a constant z is the base model: greedy output must be identical
    let mut store = ExpertStore::open(root.path(), "SmolLM2-135M-Instruct", &d).unwrap();
    store
        .add(Expert::constant(meta(&d, "flat"), &d, 0.5), &d)
        .unwrap();
    let args = [
        "generate",
        "--model",
        s(&m),
        "--experts-dir",
        &experts,
        "--prompt",
        "Name three fruits.",
        "--max-tokens",
        "16",
    ];
    let base = t2(&args);
    let mut with_expert = args.to_vec();
    with_expert.extend(["--expert", "flat"]);
    let flat = t2(&with_expert);
    assert!(
        base.status.success() && flat.status.success(),
        "{}",
        stderr(&flat)
    );
    assert_eq!(base.stdout, flat.stdout);

    let list = t2(&[
        "experts",
        "list",
        "--model",
        s(&m),
        "--experts-dir",
        &experts,
    ]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("flat"),
        "{}",
        stderr(&list)
    );

    let mut unknown = args.to_vec();
    unknown.extend(["--expert", "nope"]);
    assert_clean_failure(&t2(&unknown), "unknown expert 'nope'");

    // files written behind the store's back: NaN values, another model's expert
    let mut nan = Expert::constant(meta(&d, "nan"), &d, 0.5);
    nan.z.values_mut().next().unwrap()[0] = f32::NAN;
    let mut foreign = Expert::constant(meta(&d, "foreign"), &d, 0.5);
    foreign.meta.model_id = "Llama-3-8B".into();
    for (e, needle) in [
        (nan, "non-finite"),
        (foreign, "made for model 'Llama-3-8B'"),
    ] {
        let (root, _) = store_with(vec![]);
        let dir = root.path().join("SmolLM2-135M-Instruct");
        std::fs::create_dir_all(&dir).unwrap();
        e.save(&dir.join("x.safetensors")).unwrap();
        let manifest = serde_json::json!({"model_id": "SmolLM2-135M-Instruct", "experts": [{"name": e.meta.name, "file": "x.safetensors", "category": "math", "description": ""}]});
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        let o = t2(&[
            "generate",
            "--model",
            s(&m),
            "--experts-dir",
            s(root.path()),
            "--prompt",
            "hi",
            "--expert",
            &e.meta.name,
        ]);
        assert_clean_failure(&o, needle);
        // the same files offered to `experts install` are refused, and the store is left as it was
        let file = dir.join("x.safetensors");
        let o = t2(&[
            "experts",
            "install",
            s(&file),
            "--model",
            s(&m),
            "--experts-dir",
            &experts,
        ]);
        assert_clean_failure(&o, needle);
    }
    let manifest =
        || std::fs::read_to_string(root.path().join("SmolLM2-135M-Instruct/manifest.json"));
    let before = manifest().unwrap();
    assert!(
        !before.contains("nan") && !before.contains("foreign"),
        "{before}"
    );

    // a trained run's file goes in under a new name, provenance and all, and answers as it did
    let (other, _) = store_with(vec![]);
    let mut trained = Expert::random(meta(&d, "trained"), &d, 7, 0.3);
    trained.meta.provenance = [("best_step".to_string(), "40".to_string())].into();
    let file = other.path().join("run.safetensors");
    trained.save(&file).unwrap();
    let o = t2(&[
        "experts",
        "install",
        s(&file),
        "--name",
        "installed",
        "--model",
        s(&m),
        "--experts-dir",
        &experts,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let after = manifest().unwrap();
    assert!(
        after.contains("\"installed\"") && after.contains("best_step"),
        "{after}"
    );
    // the same file turned down to a strength validation chose, stored as an expert of its own
    let install_at = |strength: &str| {
        t2(&[
            "experts",
            "install",
            s(&file),
            "--name",
            "halfway",
            "--strength",
            strength,
            "--model",
            s(&m),
            "--experts-dir",
            &experts,
        ])
    };
    for bad in ["0", "1.5", "nan"] {
        assert_clean_failure(&install_at(bad), "--strength");
    }
    let o = install_at("0.5");
    assert!(o.status.success(), "{}", stderr(&o));
    let store = ExpertStore::open(root.path(), "SmolLM2-135M-Instruct", &d).unwrap();
    assert_eq!(store.get("installed").unwrap().z, trained.z);
    let halfway = store.get("halfway").unwrap();
    for (id, z) in &trained.z {
        let want: Vec<f32> = z.iter().map(|x| 0.5 * x + 0.5).collect();
        assert_eq!(halfway.z[id], want, "{}", id.name());
    }
    assert_eq!(halfway.meta.provenance["best_step"], "40");
    assert!(store.get("flat").is_ok(), "the store's other experts stay");
    let o = t2(&[
        "experts",
        "install",
        s(&other.path().join("missing.safetensors")),
        "--model",
        s(&m),
        "--experts-dir",
        &experts,
    ]);
    assert_clean_failure(&o, "missing.safetensors");
}

#[test]
fn corrupt_decomposition_cache_is_rebuilt_by_decompose() {
    // a private copy of the model, so its cache does not disturb other tests
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::copy(model(), &m).unwrap();
    let first = t2(&["decompose", "--model", s(&m), "--targets", "attn"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        out.contains("decomposed in") && out.contains("max relative reconstruction error"),
        "{out}"
    );
    let cache = Decomposition::cache_path(&m, TargetSet::Attn);
    let mut bytes = std::fs::read(&cache).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&cache, bytes).unwrap();
    let second = t2(&["decompose", "--model", s(&m), "--targets", "attn"]);
    assert!(second.status.success(), "{}", stderr(&second));
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(
        out.contains("rejected the old cache") && out.contains("checksum"),
        "{out}"
    );
    let third = t2(&["decompose", "--model", s(&m), "--targets", "attn"]);
    assert!(
        String::from_utf8_lossy(&third.stdout).contains("warm start"),
        "{}",
        String::from_utf8_lossy(&third.stdout)
    );
}

#[test]
fn train_and_eval_refuse_bad_input() {
    let data = repo().join("data/tasks");
    assert!(data.exists(), "run `bash scripts/fetch-data.sh` first");
    let m = model();
    let common = ["--model", s(&m), "--data", s(&data)];
    // A task that does not exist names the ones that do.
    let o = t2(&[&["train", "--task", "nosuch", "--name", "x"][..], &common].concat());
    assert_clean_failure(
        &o,
        "unknown task 'nosuch'; known tasks: arc_challenge, arc_easy, arith",
    );
    let o = t2(&[&["eval", "--task", "arith,nosuch"][..], &common].concat());
    assert_clean_failure(&o, "unknown task 'nosuch'");
    // No data at all: say how to get it.
    let o = t2(&[
        "train",
        "--task",
        "arith",
        "--name",
        "x",
        "--data",
        "/nonexistent/tasks",
    ]);
    assert_clean_failure(&o, "run `bash scripts/fetch-data.sh` first");
    // Hyper-parameters and names are checked before any work.
    let train = |args: &[&str]| t2(&[&["train", "--name", "x"][..], args, &common].concat());
    let o = train(&["--task", "arith", "--lr=-1"]);
    assert_clean_failure(&o, "learning rate must be a positive number");
    let o = t2(&[&["train", "--task", "arith", "--name", "auto"][..], &common].concat());
    assert_clean_failure(&o, "reserved");
    let o = train(&["--task", "arith", "--rollouts", "label"]);
    assert_clean_failure(&o, "label policy needs a multiple-choice task");
    let o = train(&["--task", "arc_easy", "--expected-reward"]);
    assert_clean_failure(&o, "it needs --rollouts options");
    let o = train(&["--task", "arc_easy", "--rollouts", "label", "--kl", "0.1"]);
    assert_clean_failure(&o, "KL penalty is not implemented for the label policy");
    let o = t2(&[&["eval", "--task", "arith", "--split", "dev"][..], &common].concat());
    assert_clean_failure(&o, "unknown split 'dev'");
    let o = t2(&[
        &["eval", "--task", "arith", "--adaptation", "nosuch-expert"][..],
        &common,
    ]
    .concat());
    assert_clean_failure(&o, "nosuch-expert");
    let o = t2(&[
        &[
            "eval", "--task", "arith", "--mode", "loglik", "--limit", "2",
        ][..],
        &common,
    ]
    .concat());
    assert_clean_failure(&o, "needs a multiple-choice task");

    // Route mode on an area's own task: pass 1's label of every item, right where it names the area.
    let scratch = tempfile::tempdir().unwrap();
    let json = scratch.path().join("route.json");
    let shipped = repo().join("experts");
    let o = t2(&[
        &["eval", "--task", "sst2", "--mode", "route", "--limit", "3"][..],
        &[
            "--adaptation",
            "route:classifier",
            "--adaptation",
            "route:prompt",
        ],
        &["--experts-dir", s(&shipped), "--json", s(&json)],
        &common,
    ]
    .concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    for r in rows.as_array().unwrap() {
        let labels = r["labels"].as_array().unwrap();
        let per_item = r["per_item"].as_str().unwrap();
        assert_eq!((labels.len(), per_item.len()), (3, 3), "{r}");
        for (label, right) in labels.iter().zip(per_item.chars()) {
            let label = label.as_str().unwrap();
            assert!(
                ["classification", "code", "math", "reasoning", "other"].contains(&label),
                "{r}"
            );
            assert_eq!(label == "classification", right == '1', "{r}");
        }
        assert_eq!(
            r["correct"].as_u64().unwrap() as usize,
            per_item.matches('1').count()
        );
    }

    // A damaged checkpoint is refused on resume, never half-used.
    let out = tempfile::tempdir().unwrap();
    std::fs::write(
        out.path().join("checkpoint.safetensors"),
        b"not a checkpoint at all",
    )
    .unwrap();
    let o = t2(&[
        &[
            "train",
            "--task",
            "sst2",
            "--name",
            "x",
            "--resume",
            "--no-install",
            "--out",
            s(out.path()),
        ][..],
        &common,
    ]
    .concat());
    assert_clean_failure(&o, "is unusable");
}

#[test]
fn adapt_refuses_bad_input_and_stores_nothing() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = r#"{"prompt": "What is 2+2?", "verifier": "number", "answer": 4}"#;
    let empty_store = tempfile::tempdir().unwrap();
    let shipped = repo().join("experts");
    let run = |file: &Path, extra: &[&str]| {
        t2(&[
            &["adapt", "--model", s(&m), "--task", s(file), "--name", "fs"][..],
            &["--experts-dir", s(&shipped)],
            extra,
        ]
        .concat())
    };
    let f = write("malformed.jsonl", &format!("{good}\n{{not json\n"));
    assert_clean_failure(
        &run(&f, &["--shots", "2"]),
        "malformed.jsonl:2: not valid JSON",
    );
    let f = write(
        "verifier.jsonl",
        &format!("{good}\n{{\"prompt\": \"p\", \"verifier\": \"regex\", \"answer\": \"a\"}}\n"),
    );
    assert_clean_failure(
        &run(&f, &["--shots", "2"]),
        "verifier.jsonl:2: unknown verifier 'regex' (one of number, choice, python)",
    );
    let f = write("few.jsonl", &format!("{good}\n{good}\n"));
    assert_clean_failure(&run(&f, &["--shots", "10"]), "too few examples: ");
    let o = t2(&[
        "adapt",
        "--model",
        s(&m),
        "--task",
        s(&f),
        "--name",
        "fs",
        "--shots",
        "2",
        "--experts-dir",
        s(empty_store.path()),
    ]);
    assert_clean_failure(&o, "none is loaded");
    assert_clean_failure(&run(&f, &["--shots", "2", "--elites", "40"]), "elites");
    let o = t2(&[
        "adapt",
        "--model",
        s(&m),
        "--task",
        s(&f),
        "--name",
        "auto",
        "--shots",
        "2",
    ]);
    assert_clean_failure(&o, "reserved");
    let missing = dir.path().join("missing.jsonl");
    assert_clean_failure(&run(&missing, &["--shots", "2"]), "few-shot file not found");
    // Nothing was stored anywhere by these refusals.
    assert!(std::fs::read_dir(empty_store.path())
        .unwrap()
        .next()
        .is_none());
    let manifest =
        std::fs::read_to_string(repo().join("experts/SmolLM2-135M-Instruct/manifest.json"))
            .unwrap();
    assert!(!manifest.contains("\"fs\""));
}

/// The GPU machine's correctness checks run from the release binary; here they run on the CPU against the
/// CPU (so every f32 comparison is exact), which keeps the checks themselves working between GPU visits.
#[test]
fn selftest_runs_every_check_and_refuses_a_device_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("selftest.json");
    let o = t2(&[
        "selftest",
        "--device",
        "cpu",
        "--model",
        s(&model()),
        "--tokens",
        "16",
        "--json",
        s(&json),
    ]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let checks = r["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in [
        "qwen2",
        "qwen3",
        "llama3 rope scaling",
        "mixes in one batch",
        "merged == factored",
        "base and 2 mlp mixes: device (stacked) vs CPU",
    ] {
        assert!(
            names.iter().any(|n| n.contains(want)),
            "no check on {want}: {names:?}"
        );
    }
    // On the CPU the checked model is stacked (what a GPU serves), the reference is not.
    let stacked = names.iter().filter(|n| n.contains("(stacked)")).count();
    assert_eq!(stacked, 7 + 1, "{names:?}");
    // Six reference prompts, two checks each, beside the random-model checks.
    assert!(checks.len() >= 10 + 12, "{names:?}");
    assert!(checks.iter().all(|c| c["passed"] == true), "{r}");
    assert_eq!(r["failed"], 0);
    if !candle_core::utils::cuda_is_available() {
        let o = t2(&["selftest", "--device", "cuda", "--no-model"]);
        assert_clean_failure(&o, "built without the cuda feature");
    }
}

/// `t2 adapt --likelihood --state`: a search stopped after one iteration and run again for two goes on
/// where it stopped and draws what an unbroken two-iteration search draws; a state of other settings and
/// shots that cannot be scored by likelihood are refused.
#[test]
fn adapt_by_likelihood_resumes_a_stopped_search_as_if_unbroken() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let shots = dir.path().join("capitals.jsonl");
    std::fs::write(
        &shots,
        concat!(
            r#"{"prompt": "What is the capital of France?", "verifier": "choice", "options": ["Paris", "Rome", "Oslo"], "answer": "Paris"}"#,
            "\n",
            r#"{"prompt": "What is the capital of Italy?", "verifier": "choice", "options": ["Madrid", "Rome"], "answer": 1}"#,
            "\n",
        ),
    )
    .unwrap();
    let shipped = repo().join("experts");
    // `t2 adapt` of these shots by likelihood with the shipped experts, then `extra`.
    let adapt = |task: &Path, extra: &[&str]| {
        t2(&[
            &["adapt", "--model", s(&m), "--task", s(task), "--name", "fs"][..],
            &["--experts-dir", s(&shipped), "--shots", "2", "--likelihood"],
            extra,
        ]
        .concat())
    };
    let run = |iterations: &str, extra: &[&str]| {
        let o = adapt(
            &shots,
            &[
                &[
                    "--population",
                    "4",
                    "--elites",
                    "2",
                    "--iterations",
                    iterations,
                    "--no-save",
                ],
                extra,
            ]
            .concat(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        o
    };
    let history = |p: &Path| -> Vec<serde_json::Value> {
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        doc["outcome"]["history"].as_array().unwrap().clone()
    };
    let (state, first, resumed, whole) = (
        dir.path().join("search.json"),
        dir.path().join("first.json"),
        dir.path().join("resumed.json"),
        dir.path().join("whole.json"),
    );
    run("1", &["--state", s(&state), "--json", s(&first)]);
    assert_eq!(history(&first).len(), 1);
    let o = run("2", &["--state", s(&state), "--json", s(&resumed)]);
    assert!(
        stderr(&o).contains("going on from iteration 2"),
        "{}",
        stderr(&o)
    );
    run("2", &["--json", s(&whole)]);
    let (resumed, whole) = (history(&resumed), history(&whole));
    assert_eq!(resumed.len(), 2);
    for (r, w) in resumed.iter().zip(&whole) {
        // Timings differ between runs; what was drawn and scored must not.
        for key in ["best", "best_so_far", "mean", "std", "mean_accuracy"] {
            assert_eq!(r[key], w[key], "iteration {}: {key}", r["iteration"]);
        }
    }
    assert!(whole[0]["best"]["loglik"].as_f64().unwrap() < 0.0);
    // The sparsity prior's first population: the base model, then the first expert alone (half of a
    // population of 4 is seeded); `--no-sparsity-prior` draws them all.
    let alphas = |h: &serde_json::Value| -> Vec<Vec<f64>> {
        h["population"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                c["alpha"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let first = alphas(&whole[0]);
    assert_eq!(first.len(), 4);
    assert!(first[0].iter().all(|&x| x == 0.0), "{first:?}");
    assert_eq!(first[1][0], 1.0);
    assert!(first[1][1..].iter().all(|&x| x == 0.0), "{first:?}");
    let drawn = dir.path().join("drawn.json");
    run("1", &["--no-sparsity-prior", "--json", s(&drawn)]);
    let drawn = alphas(&history(&drawn)[0]);
    assert_eq!(drawn[2..], first[2..]);
    assert!(drawn[0] != first[0] && drawn[1] != first[1], "{drawn:?}");

    let o = adapt(
        &shots,
        &[
            "--population",
            "6",
            "--elites",
            "2",
            "--iterations",
            "2",
            "--no-save",
            "--state",
            s(&state),
        ],
    );
    assert_clean_failure(&o, "holds a search with other settings or shots");
    let numbers = dir.path().join("numbers.jsonl");
    let n = r#"{"prompt": "What is 2+2?", "verifier": "number", "answer": 4}"#;
    std::fs::write(&numbers, format!("{n}\n{n}\n")).unwrap();
    let o = adapt(
        &numbers,
        &[
            "--population",
            "4",
            "--elites",
            "2",
            "--iterations",
            "1",
            "--no-save",
        ],
    );
    assert_clean_failure(&o, "likelihood scoring needs multiple-choice examples");
}

/// `t2 adapt --holdout`: the result is chosen on examples the search never saw, among the search's best,
/// its mean, base and each expert alone, and is what the outcome reports; a saved search that already
/// ran every iteration gives its result again (the choice can be made afterwards), also when the hold-out
/// is asked as "the rest, up to N"; too few examples for shots plus hold-out are refused.
#[test]
fn adapt_chooses_its_result_on_held_out_examples() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let shots = dir.path().join("capitals.jsonl");
    let line = |country: &str, options: &str, answer: &str| {
        format!(
            r#"{{"prompt": "What is the capital of {country}?", "verifier": "choice", "options": {options}, "answer": "{answer}"}}"#
        )
    };
    let lines = [
        line("France", r#"["Paris", "Rome", "Oslo"]"#, "Paris"),
        line("Italy", r#"["Madrid", "Rome"]"#, "Rome"),
        line("Norway", r#"["Oslo", "Berlin"]"#, "Oslo"),
        line("Spain", r#"["Lisbon", "Madrid"]"#, "Madrid"),
    ];
    std::fs::write(&shots, lines.join("\n") + "\n").unwrap();
    let shipped = repo().join("experts");
    let state = dir.path().join("search.json");
    let task = [
        "adapt",
        "--model",
        s(&m),
        "--task",
        s(&shots),
        "--name",
        "fs",
        "--experts-dir",
        s(&shipped),
        "--no-save",
    ];
    let adapt = |extra: &[&str]| {
        t2(&[
            &task[..],
            &["--likelihood", "--population", "4", "--elites", "2"],
            &["--iterations", "1", "--state", s(&state), "--shots", "2"],
            extra,
        ]
        .concat())
    };
    let outcome = |p: &Path| -> serde_json::Value {
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        doc["outcome"].clone()
    };
    let (searched, again) = (
        dir.path().join("searched.json"),
        dir.path().join("again.json"),
    );
    let o = adapt(&["--holdout", "2", "--json", s(&searched)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("(chosen)"), "{}", stdout(&o));
    let first = outcome(&searched);
    let held = &first["holdout"];
    assert_eq!(held["ids"].as_array().unwrap().len(), 2);
    let labels: Vec<&str> = held["contenders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels[0], "search best", "{labels:?}");
    // Base is a contender, under its own label or an earlier one that runs as base.
    assert!(
        held["contenders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["shots"]["alpha"]
                .as_array()
                .unwrap()
                .iter()
                .all(|a| a.as_f64() == Some(0.0))),
        "{held}"
    );
    let chosen = &held["contenders"][held["chosen"].as_u64().unwrap() as usize];
    assert_eq!(first["best"], chosen["shots"], "{held}");
    // A contender the search drew keeps the search's score on the shots; the others are scored anew.
    let population = first["history"][0]["population"].as_array().unwrap();
    for c in held["contenders"].as_array().unwrap() {
        let shots = &c["shots"];
        assert!(
            (0.0..=1.0).contains(&shots["accuracy"].as_f64().unwrap()),
            "{c}"
        );
        if let Some(drawn) = population.iter().find(|p| p["alpha"] == shots["alpha"]) {
            assert_eq!(drawn, shots, "{held}");
        }
    }
    for c in held["contenders"].as_array().unwrap() {
        let acc = c["holdout"]["accuracy"].as_f64().unwrap();
        assert!(
            acc <= chosen["holdout"]["accuracy"].as_f64().unwrap(),
            "{held}"
        );
    }
    // The finished search, asked again: no new iteration, the same choice. `--holdout-max` takes the
    // two examples the shots leave, the same hold-out as `--holdout 2`.
    let o = adapt(&["--holdout-max", "400", "--json", s(&again)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let again = outcome(&again);
    assert_eq!(again["history"].as_array().unwrap().len(), 1);
    assert_eq!(
        again["history"][0]["population"],
        first["history"][0]["population"]
    );
    assert_eq!(again["holdout"]["chosen"], held["chosen"]);
    assert_eq!(again["holdout"]["ids"], held["ids"]);
    let o = adapt(&["--holdout", "3"]);
    assert_clean_failure(&o, "too few examples");
    let o = t2(&[&task[..], &["--shots", "4", "--holdout-max", "10"]].concat());
    assert_clean_failure(&o, "leaving none for --holdout-max");
}
