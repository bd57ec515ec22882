"""govllm/structured.py: parsing structured_outputs, xgrammar errors as 400s, the compile time bound
(the event loop keeps serving), sharing, caching and the bounded pool. No model: the tokenizer only."""

from __future__ import annotations

import asyncio
import time

import pytest

from govllm import structured
from govllm.backend import RequestError


def big_schema(n: int) -> dict:
    """A schema whose compile takes about a second per 70 properties here (nested objects, patterns)."""
    props = {}
    for i in range(n):
        props[f"field_{i}"] = {
            "type": "object",
            "properties": {
                "a": {"type": "string", "pattern": "[a-z]{3,8}[0-9]{2,5}"},
                "b": {"type": "integer", "minimum": 0, "maximum": 1000 + i},
                "c": {"enum": [f"x{i}", f"y{i}", "z"]},
                "d": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 5},
            },
            "required": ["a", "b", "c"],
        }
    return {"type": "object", "properties": props, "required": list(props)}


@pytest.fixture(scope="module")
def compiler(tokenizer):
    c = structured.StructuredCompiler(tokenizer, 49152, [tokenizer.eos_token_id])
    yield c
    c.close()


@pytest.fixture(scope="module")
def validator():
    c = structured.StructuredCompiler()  # no tokenizer: what the vLLM backend pre-checks with
    yield c
    c.close()


def run(loop, coro):
    return loop.run_until_complete(coro)


@pytest.mark.parametrize("spec, kind, source", [
    ({"json": {"type": "object"}}, "json", '{"type": "object"}'),
    ({"json": '{"type":"object"}'}, "json", '{"type": "object"}'),
    ({"json_object": True}, "json_object", '{"type": "object"}'),
    ({"regex": "a+"}, "regex", "a+"),
    ({"choice": ["a", 'b"c', "d\\e", "f\ng", "é😀"]}, "choice",
     'root ::= "a" | "b\\"c" | "d\\\\e" | "f\\u000ag" | "\\u00e9\\U0001f600"'),
    ({"grammar": 'root ::= "x"'}, "ebnf", 'root ::= "x"'),
    ({"grammar": 'start: "x"'}, "lark", 'start: "x"'),
])
def test_parse_spec(spec, kind, source):
    parsed = structured.parse_spec({**spec, "param": "response_format"})
    assert (parsed.kind, parsed.source, parsed.param) == (kind, source, "response_format")
    assert structured.parse_spec(spec).param == "structured_outputs"
    compact = structured.parse_spec({**spec, "disable_any_whitespace": True}).any_whitespace
    assert compact is (kind not in ("json", "json_object"))  # whitespace is JSON's only


def test_choice_grammar_is_exactly_the_choices(loop, compiler):
    """Quotes, backslashes, newlines and astral characters are escaped: each choice matches whole,
    and nothing else does (a prefix, a concatenation, the unescaped text)."""
    choices = ["yes", 'no "way"', "back\\slash", "two\nlines", "é😀", ""]
    constraint = run(loop, compiler.compile_constraint({"choice": choices}))
    for text in choices:
        m = compiler.matcher(constraint)
        assert m.accept_string(text) and m.is_completed(), text
    for text in ["ye", "yesno", 'no \\"way\\"', "back\\\\slash", "x"]:
        m = compiler.matcher(constraint)
        assert not (m.accept_string(text) and m.is_completed()), text


BAD_SPECS = [
    ("schema-not-json", {"json": '{"type": '}, "not valid JSON"),
    ("schema-not-object", {"json": "[1, 2]"}, "must be a JSON object"),
    ("schema-bad-type", {"json": {"type": "foo"}}, 'Unsupported type "foo"'),
    ("schema-bad-range", {"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "minimum greater than maximum"),
    ("schema-bad-pattern", {"json": {"type": "string", "pattern": "a(b"}}, "parenthesis is not closed"),
    ("regex-syntax", {"regex": "a(b"}, "parenthesis is not closed"),
    ("regex-backreference", {"regex": r"(a)\1"}, "Backreference is not supported"),
    ("regex-lookahead", {"regex": "a(?=b)"}, "Lookahead is not supported"),
    ("ebnf-syntax", {"grammar": 'root ::= "a" | ('}, "EBNF parser error"),
    ("ebnf-undefined-rule", {"grammar": "root ::= foo"}, 'Rule "foo" is not defined'),
    ("choice-not-strings", {"choice": [1, 2]}, "non-empty list of strings"),
    ("choice-empty", {"choice": []}, "non-empty list of strings"),
    ("two-kinds", {"regex": "a", "choice": ["a"]}, "exactly one of"),
]


@pytest.mark.parametrize("name, spec, message", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
@pytest.mark.parametrize("param", ["response_format", "structured_outputs", "tool_choice"])
def test_bad_specs_are_400s_naming_the_param(loop, compiler, validator, name, spec, message, param):
    for c in (compiler, validator):
        with pytest.raises(RequestError) as info:
            run(loop, c.compile_constraint({**spec, "param": param}, 30.0))
        assert info.value.param == param and info.value.status == 400
        assert message in str(info.value), str(info.value)
        assert "/project/cpp" not in str(info.value)  # xgrammar's source location is stripped


def test_valid_specs_compile_and_validate(loop, compiler, validator):
    for spec in [{"json": {"type": "object", "properties": {"a": {"enum": [1, 2]}}}}, {"json_object": True},
                 {"regex": "[0-9]{3}"}, {"choice": ["a", "b"]}, {"grammar": 'root ::= "a" | "b"'},
                 {"grammar": 'start: "yes" | "no"'}]:
        compiled = run(loop, compiler.compile_constraint(spec))
        assert type(compiled.compiled).__name__ == "CompiledGrammar"
        assert type(run(loop, validator.compile_constraint(spec)).compiled).__name__ == "Grammar"


def test_json_object_is_an_object_root(loop, compiler):
    constraint = run(loop, compiler.compile_constraint({"json_object": True}))
    for text, ok in [('{"a": [1, {"b": null}]}', True), ("[1, 2]", False), ('"s"', False)]:
        m = compiler.matcher(constraint)
        assert (m.accept_string(text) and m.is_completed()) == ok, text


def test_compile_releases_the_gil_and_times_out(loop, tokenizer):
    """A compile past its bound is a 400 naming the param and the option; while it runs the loop
    keeps ticking (xgrammar releases the GIL on the worker); the compile that went on in the
    background lands in the cache, so the same schema then compiles at once, without a new compile."""
    c = structured.StructuredCompiler(tokenizer, 49152, [tokenizer.eos_token_id])
    try:
        run(loop, c.ready())
        spec = {"json": big_schema(40), "param": "response_format"}

        async def scenario():
            gaps, stop = [], asyncio.Event()

            async def tick():
                last = time.perf_counter()
                while not stop.is_set():
                    await asyncio.sleep(0.001)
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            ticker = asyncio.create_task(tick())
            t0 = time.perf_counter()
            with pytest.raises(RequestError) as info:
                await c.compile_constraint(spec, 0.001)
            answered = time.perf_counter() - t0
            while c.inflight():  # the compile goes on in its worker
                await asyncio.sleep(0.005)
            busy = time.perf_counter() - t0
            stop.set()
            await ticker
            return info.value, answered, busy, gaps

        err, answered, busy, gaps = run(loop, scenario())
        assert err.param == "response_format"
        assert "did not compile within 0.001 s (--structured-output-timeout)" in str(err)
        assert "json schema" in str(err)
        assert answered < 2, answered  # the bound, not the compile, answered (loose: a loaded 2-core VM)
        assert busy > 0.2, f"the schema compiled in {busy:.3f} s: too small to measure the loop"
        assert len(gaps) > busy / 0.01, (len(gaps), busy)  # the loop ticked throughout
        # A compile holding the GIL would stall the loop for all of it; scheduling noise on a busy
        # machine is far less than half of it.
        assert max(gaps) < max(0.25, busy / 2), f"the loop stalled {max(gaps):.3f} s during a {busy:.3f} s compile"
        compiles = c.compiles
        t0 = time.perf_counter()
        again = run(loop, c.compile_constraint(spec, 0.001))
        assert time.perf_counter() - t0 < 0.5 and c.compiles == compiles
        assert type(again.compiled).__name__ == "CompiledGrammar"
    finally:
        c.close()


def test_queued_compile_is_cancelled_and_identical_ones_shared(loop, tokenizer):
    """One worker: a compile queued behind a slow one times out and is dropped before it runs;
    identical specs share one compile; the LRU keeps at most cache_entries grammars."""
    c = structured.StructuredCompiler(tokenizer, 49152, [tokenizer.eos_token_id], workers=1, cache_entries=2)
    try:
        run(loop, c.ready())

        async def scenario():
            slow = asyncio.ensure_future(c.compile_constraint({"json": big_schema(30)}, 60.0))
            await asyncio.sleep(0.05)
            with pytest.raises(RequestError, match="regex did not compile within 0.05 s"):
                await c.compile_constraint({"regex": "[0-9]{4}", "param": "structured_outputs"}, 0.05)
            assert c.inflight() == 1  # only the slow one: the queued regex was cancelled
            shared = await asyncio.gather(c.compile_constraint({"json": big_schema(30)}, 60.0), slow)
            return shared

        a, b = run(loop, scenario())
        assert a.compiled is b.compiled and c.compiles == 2  # the regex was counted, never run
        assert c.inflight() == 0
        for pattern in ("a", "b", "c"):
            run(loop, c.compile_constraint({"regex": pattern}))
        assert len(c._cache) == 2
    finally:
        c.close()


def test_structured_timeout_from_config():
    assert structured.structured_timeout({}) == structured.DEFAULT_TIMEOUT_S == 5.0
    assert structured.structured_timeout({"structured_output_timeout": "0.5"}) == 0.5
    with pytest.raises(ValueError):
        structured.structured_timeout({"structured_output_timeout": 0})


def test_xgrammar_is_the_tested_version():
    assert structured.xgrammar_version() == structured.TESTED_XGRAMMAR
