"""schemathesis hooks for test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

Caps every generated max_tokens / max_completion_tokens at MAX_TOKENS_CAP, so that the requests that reach
the model stay short on a 2-core machine. The OpenAPI document sets no maximum on these fields (the
context decides it), so the cap never turns a schema-violating case into a valid one or back.
"""

import schemathesis

MAX_TOKENS_CAP = 4


@schemathesis.hook
def before_call(ctx, case, kwargs):
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS_CAP:
                body[key] = MAX_TOKENS_CAP
