//! Guards the task splits that `scripts/fetch-data.sh` writes: ids unique, no test item leaking into a train
//! or val split (by id or by normalised prompt), route built only from the matching splits (its `other`
//! items and route_ood from no task), and every answer checkable. Fails (never skips) when the data is
//! missing.

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
        "route_ood",
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
                // ARC's log-likelihood protocol asks the question alone: every item carries it, and it is
                // the question its lettered prompt shows.
                if name.starts_with("arc_") {
                    let stem = it.stem.as_deref().unwrap_or_default();
                    assert!(
                        !stem.trim().is_empty()
                            && it.prompt.starts_with(&format!("Question: {stem}\nA. ")),
                        "{}: stem {stem:?} is not the prompt's question",
                        it.id
                    );
                }
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

    // route: test prompts are unseen by every train/val split; train/val prompts come from no test split;
    // the labels of an area come from that area's tasks, "other" from no task at all
    let route = all.iter().find(|l| l.task.name() == "route").unwrap();
    let ood = all.iter().find(|l| l.task.name() == "route_ood").unwrap();
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
    let route_train_val: HashSet<String> = ["train", "val"]
        .iter()
        .filter_map(|s| route.splits.get(s))
        .flat_map(prompts)
        .collect();
    for (split, items) in &route.splits {
        let mut per_label: BTreeMap<&str, usize> = BTreeMap::new();
        for it in items {
            let label = route_label(it);
            *per_label.entry(label).or_default() += 1;
            let p = norm(&it.prompt);
            if *split == "test" {
                assert!(
                    !train_val.contains(&p),
                    "route test item {} appears in a train/val split",
                    it.id
                );
            } else {
                assert!(
                    !tests.contains(&p),
                    "route {split} item {} comes from a test split",
                    it.id
                );
            }
            if label == "other" {
                assert!(
                    !train_val.contains(&p) && !tests.contains(&p),
                    "route {split} item {} is labelled other but is some task's prompt",
                    it.id
                );
            } else if *split != "test" {
                assert!(
                    train_val.contains(&p),
                    "route {split} item {} is from no task's train/val split",
                    it.id
                );
            }
        }
        // balanced, and every label (other included) in every split
        let n = items.len() / ROUTE_LABELS.len();
        assert_eq!(
            per_label,
            ROUTE_LABELS.iter().map(|l| (*l, n)).collect(),
            "route/{split}: labels unbalanced"
        );
    }
    assert!(
        route.task.has_split(Split::Train),
        "route has no train split"
    );

    // route_ood: a test set only, every item other, never seen by any train/val split (route's included)
    assert_eq!(ood.task.info.area, "routing");
    assert_eq!(ood.splits.keys().copied().collect::<Vec<_>>(), ["test"]);
    assert!(ood.splits["test"].len() >= 300, "route_ood is too small");
    for it in &ood.splits["test"] {
        assert_eq!(route_label(it), "other", "{}: not labelled other", it.id);
        let p = norm(&it.prompt);
        assert!(
            !route_train_val.contains(&p) && !train_val.contains(&p),
            "route_ood item {} appears in a train/val split",
            it.id
        );
    }

    // every skill area has something to train an expert on
    for area in ["math", "code", "reasoning", "classification"] {
        assert!(
            all.iter()
                .any(|l| l.task.info.area == area && l.splits.contains_key("train")),
            "no task in area {area} has a train split"
        );
    }
}

/// The pass-1 labels in the order the server lists them (t2-engine's `routing::CATEGORIES`, "other" last):
/// the router is trained on prompts that list its options, so the order must be the served one.
const ROUTE_LABELS: [&str; 5] = ["code", "math", "reasoning", "classification", "other"];

/// A routing item's label, after checking that its options are exactly [`ROUTE_LABELS`].
fn route_label(it: &TaskItem) -> &str {
    let Answer::Choice {
        options,
        correct,
        lettered: false,
    } = &it.answer
    else {
        panic!("{}: a routing item must be an unlettered choice", it.id);
    };
    assert_eq!(options, &ROUTE_LABELS, "{}: route options", it.id);
    &options[*correct]
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
