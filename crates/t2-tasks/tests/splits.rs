//! Guards the task splits that `scripts/fetch-data.sh` writes: ids unique, no test item leaking into a train
//! or val split (by id or by normalised prompt), route built only from the matching splits, and every answer
//! checkable. Fails (never skips) when the data is missing.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use t2_tasks::data::{list, read_items, Answer, Split, Task, TaskItem};

fn data_dir() -> PathBuf {
    match std::env::var_os("T2_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/tasks"),
    }
}

/// Lowercase, whitespace collapsed: the identity of a prompt for leak checks (as in build_tasks.py).
fn norm(prompt: &str) -> String {
    prompt
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

struct Loaded {
    task: Task,
    splits: BTreeMap<&'static str, Vec<TaskItem>>,
}

fn load_all() -> Vec<Loaded> {
    let root = data_dir();
    let names = list(&root).unwrap_or_else(|_| {
        panic!(
            "no task data at {}: run `bash scripts/fetch-data.sh` first (or set T2_DATA)",
            root.display()
        )
    });
    names
        .iter()
        .map(|name| {
            let task = Task::open(&root, name).unwrap();
            let mut splits = BTreeMap::new();
            for split in Split::ALL {
                if task.has_split(split) {
                    // read through read_items too, the lower-level entry point
                    let items = read_items(&task.split_path(split)).unwrap();
                    assert_eq!(items, task.items(split).unwrap());
                    splits.insert(split.as_str(), items);
                }
            }
            Loaded { task, splits }
        })
        .collect()
}

fn prompts<'a>(items: impl IntoIterator<Item = &'a TaskItem>) -> HashSet<String> {
    items.into_iter().map(|it| norm(&it.prompt)).collect()
}

#[test]
fn splits_are_disjoint_and_answers_checkable() {
    let all = load_all();
    let names: Vec<&str> = all.iter().map(|l| l.task.name()).collect();
    for expected in [
        "arith",
        "gsm8k",
        "pyfunc",
        "mbpp",
        "arc_easy",
        "arc_challenge",
        "sst2",
        "route",
    ] {
        assert!(
            names.contains(&expected),
            "task {expected} missing; have {names:?}"
        );
    }

    for l in &all {
        let name = l.task.name();
        assert!(!l.splits.is_empty(), "{name}: no split files");
        assert!(l.splits.contains_key("test"), "{name}: no test split");

        let mut ids = HashSet::new();
        for (split, items) in &l.splits {
            assert!(!items.is_empty(), "{name}/{split}: empty split file");
            assert_eq!(
                l.task.info.counts.get(*split),
                Some(&items.len()),
                "{name}/{split}: task.json counts disagree with the file"
            );
            for it in items {
                assert!(
                    it.id.starts_with(&format!("{name}/")),
                    "{name}: id {} lacks the task prefix",
                    it.id
                );
                assert!(ids.insert(it.id.clone()), "{name}: duplicate id {}", it.id);
                assert!(!it.prompt.trim().is_empty(), "{}: empty prompt", it.id);
                check_answer(it);
            }
        }

        let test = &l.splits["test"];
        let test_prompts = prompts(test);
        for split in ["train", "val"] {
            let Some(items) = l.splits.get(split) else {
                continue;
            };
            for it in items {
                assert!(
                    !test_prompts.contains(&norm(&it.prompt)),
                    "{name}: {split} item {} repeats a test prompt",
                    it.id
                );
            }
            // ids are unique across the task, so no test id is in train/val; said explicitly:
            let split_ids: HashSet<&str> = items.iter().map(|it| it.id.as_str()).collect();
            assert!(test.iter().all(|it| !split_ids.contains(it.id.as_str())));
        }
    }

    // route: test prompts are unseen by every train/val split; train/val prompts come from no test split
    let route = all.iter().find(|l| l.task.name() == "route").unwrap();
    let mut train_val = HashSet::new();
    let mut tests = HashSet::new();
    for l in all.iter().filter(|l| l.task.name() != "route") {
        for (split, items) in &l.splits {
            if *split == "test" {
                tests.extend(prompts(items));
            } else {
                train_val.extend(prompts(items));
            }
        }
    }
    for it in &route.splits["test"] {
        assert!(
            !train_val.contains(&norm(&it.prompt)),
            "route test item {} appears in a train/val split",
            it.id
        );
    }
    for split in ["train", "val"] {
        for it in route.splits.get(split).map(Vec::as_slice).unwrap_or(&[]) {
            let p = norm(&it.prompt);
            assert!(
                !tests.contains(&p),
                "route {split} item {} comes from a test split",
                it.id
            );
            assert!(
                train_val.contains(&p),
                "route {split} item {} is from no task's train/val split",
                it.id
            );
        }
    }
    assert!(
        route.task.has_split(Split::Train),
        "route has no train split"
    );

    // every skill area has something to train an expert on
    for area in ["math", "code", "reasoning", "classification"] {
        assert!(
            all.iter()
                .any(|l| l.task.info.area == area && l.splits.contains_key("train")),
            "no task in area {area} has a train split"
        );
    }
}

fn check_answer(it: &TaskItem) {
    match &it.answer {
        Answer::Number { value } => {
            let v = value.replace(',', "");
            assert!(
                v.trim().parse::<f64>().is_ok(),
                "{}: number answer {value:?} does not parse",
                it.id
            );
        }
        Answer::Choice {
            options, correct, ..
        } => {
            assert!(options.len() >= 2, "{}: fewer than two options", it.id);
            assert!(
                *correct < options.len(),
                "{}: correct index {correct} out of range",
                it.id
            );
        }
        Answer::Python { entry_point, tests } => {
            assert!(!entry_point.is_empty(), "{}: empty entry point", it.id);
            assert!(
                tests.iter().any(|t| t.contains(entry_point.as_str())),
                "{}: no test mentions {entry_point}",
                it.id
            );
        }
    }
}
