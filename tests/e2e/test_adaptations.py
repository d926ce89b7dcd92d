"""Few-shot adaptation jobs over real HTTP (`/v1/adaptations`): a job runs the CEM search on posted
examples, reports progress, stores a profile with provenance that then serves as `<model>:<name>`;
bad input is refused before anything is queued, and failed or cancelled jobs store nothing."""

from __future__ import annotations

import json
import time

import pytest

from t2_harness import BASE_MODEL, EXPERTS, assert_openai_error, extra_field, http_request, post_json

EXAMPLES = [
    {"prompt": "What is 2 + 3? Answer with the number only.", "verifier": "number", "answer": 5},
    {"prompt": "What is 10 - 4? Answer with the number only.", "verifier": "number", "answer": "6"},
    {"prompt": "Is the sky blue? Answer yes or no.", "verifier": "choice", "options": ["yes", "no"],
     "answer": "yes"},
]
TINY = {"iterations": 2, "population": 3, "elites": 1, "max_tokens": 4, "seed": 3}


def wait_job(base_url, job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = http_request(base_url, "GET", f"/v1/adaptations/{job_id}")
        assert resp.status == 200, resp
        job = resp.json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def experts_listing(base_url):
    resp = http_request(base_url, "GET", "/v1/experts")
    assert resp.status == 200
    return {m["name"]: m for m in resp.json()["mixes"]}


def test_job_searches_stores_a_profile_and_serves_it(client, base_url):
    resp = post_json(base_url, "/v1/adaptations", {"name": "fewshot-e2e", "examples": EXAMPLES, **TINY})
    assert resp.status == 202, resp
    job = resp.json()
    assert job["object"] == "adaptation.job" and job["status"] in ("queued", "running"), job
    assert job["shots"] == 3 and sorted(job["experts"]) == sorted(EXPERTS), job
    listed = http_request(base_url, "GET", "/v1/adaptations").json()
    assert any(j["id"] == job["id"] for j in listed["data"])
    done = wait_job(base_url, job["id"])
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert done["progress"]["iteration"] == TINY["iterations"]
    # One weight per expert; a search whose best candidate had every weight at 0 stores the base model.
    assert set(result["alpha"]) in (set(EXPERTS), {"base"}), result
    assert all(0.0 <= w <= 1.0 for w in result["alpha"].values())
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["generations"] == TINY["iterations"] * TINY["population"] * len(EXAMPLES)
    assert result["model"] == f"{BASE_MODEL}:fewshot-e2e"
    # Stored with provenance, listed, and usable as a model id.
    mix = experts_listing(base_url)["fewshot-e2e"]
    assert mix["alpha"] == pytest.approx(result["alpha"])
    prov = mix["provenance"]
    assert prov["shots"] == "3" and prov["seed"] == "3" and prov["iterations"] == "2", prov
    assert float(prov["score"]) == pytest.approx(result["accuracy"], abs=1e-4)
    raw = client.chat.completions.with_raw_response.create(
        model=result["model"], messages=[{"role": "user", "content": "What is 1 + 1?"}], max_tokens=4,
        temperature=0)
    reported = extra_field(raw.parse(), "adaptation")
    assert reported["strategy"] == "profile" and reported["profile"] == "fewshot-e2e", reported
    assert reported["mix"] == pytest.approx({k: v for k, v in result["alpha"].items()})


def test_job_with_holdout_chooses_its_result_on_unseen_examples(base_url):
    body = {"name": "fewshot-held-e2e", "examples": EXAMPLES, "shots": 2, "holdout": 1, **TINY}
    resp = post_json(base_url, "/v1/adaptations", body)
    assert resp.status == 202, resp
    done = wait_job(base_url, resp.json()["id"])
    assert done["status"] == "succeeded", done
    result = done["result"]
    # The search scored only its 2 shots; the choice among its best, its mean, base and each expert
    # alone was made on the third example.
    assert result["generations"] == TINY["iterations"] * TINY["population"] * 2
    contenders = {"search best", "search mean", "base"} | {f"{e} alone" for e in EXPERTS}
    assert result["chosen_on_held_out"] in contenders, result
    assert result["held_out_accuracy"] in (0.0, 1.0), result
    prov = experts_listing(base_url)["fewshot-held-e2e"]["provenance"]
    assert prov["held_out_examples"] == "1" and prov["chosen_on_held_out"] == result["chosen_on_held_out"], prov


@pytest.mark.parametrize("body, message, param", [
    ({"name": "x", "examples": [EXAMPLES[0], {"prompt": "p", "verifier": "regex", "answer": "a"}]},
     "examples[1]: unknown verifier 'regex'", "examples"),
    ({"name": "x", "examples": [EXAMPLES[0]]}, "too few examples", "examples"),
    ({"name": "x", "examples": EXAMPLES, "shots": 5}, "only 3 examples", "shots"),
    ({"name": "x", "examples": EXAMPLES, "shots": 2, "holdout": 2}, "more than the 3 examples", "holdout"),
    ({"name": "x", "examples": [EXAMPLES[0], "just text"]}, "JSON object", "examples"),
    ({"name": "x", "examples": [EXAMPLES[0], {"prompt": "p", "verifier": "choice", "options": ["a", "b"],
                                              "answer": "c"}]}, "not one of the 2 options", "examples"),
    ({"name": "math", "examples": EXAMPLES}, "already an expert", "name"),
    ({"name": "bad name!", "examples": EXAMPLES}, "not a valid name", "name"),
    ({"name": "x", "examples": EXAMPLES, "experts": ["nope"]}, "nope", "experts"),
    ({"name": "x", "examples": EXAMPLES, "elites": 40}, "elites", "iterations"),
])
def test_bad_jobs_are_refused_before_queueing(base_url, body, message, param):
    before = len(http_request(base_url, "GET", "/v1/adaptations").json()["data"])
    resp = post_json(base_url, "/v1/adaptations", body)
    error = assert_openai_error(resp, 400, param=param)
    assert message in error["message"], error
    assert len(http_request(base_url, "GET", "/v1/adaptations").json()["data"]) == before


def test_malformed_body_and_unknown_job(base_url):
    resp = http_request(base_url, "POST", "/v1/adaptations", "{not json", {"Content-Type": "application/json"})
    assert_openai_error(resp, 400)
    resp = post_json(base_url, "/v1/adaptations", {"name": "x", "examples": EXAMPLES, "surprise": 1})
    assert_openai_error(resp, 400)
    for method in ("GET", "DELETE"):
        resp = http_request(base_url, method, "/v1/adaptations/adapt-doesnotexist")
        error = assert_openai_error(resp, 404, code="not_found")
        assert "adapt-doesnotexist" in error["message"]


def test_failed_job_stores_nothing(base_url):
    # Passes validation, then fails in generation: this prompt is longer than the model's context.
    long_prompt = "word " * 9000
    examples = [{"prompt": long_prompt, "verifier": "number", "answer": 1}, EXAMPLES[0]]
    resp = post_json(base_url, "/v1/adaptations", {"name": "fails-e2e", "examples": examples, **TINY})
    assert resp.status == 202, resp
    done = wait_job(base_url, resp.json()["id"])
    assert done["status"] == "failed", done
    assert "context" in done["error"], done
    assert done["result"] is None
    assert "fails-e2e" not in experts_listing(base_url)


def test_cancelled_job_stores_nothing(base_url):
    resp = post_json(base_url, "/v1/adaptations",
                     {"name": "cancelled-e2e", "examples": EXAMPLES, **TINY, "iterations": 50})
    assert resp.status == 202, resp
    job_id = resp.json()["id"]
    resp = http_request(base_url, "DELETE", f"/v1/adaptations/{job_id}")
    assert resp.status == 200, resp
    done = wait_job(base_url, job_id)
    assert done["status"] == "cancelled", done
    assert done["progress"]["iteration"] < 50
    assert "cancelled-e2e" not in experts_listing(base_url)
