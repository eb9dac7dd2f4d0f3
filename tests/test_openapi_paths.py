"""Path templates with several parameters in one segment (`/files/{name}.{ext}`): matched
in time linear in the path, with the same matches and captures as the plain lazy
pattern, which retried every split (cubic in the segment for three parameters)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy.openapi import compile_spec
from proxy.policy.openapi_model import Spec

TEMPLATES = ["/f/{a}.{b}", "/f/{a}.{b}.json", "/f/{a}.{b}.{c}", "/f/x{a}-{b}y/{c}",
             "/f/{a}..{b}", "/{a}/{b}.{c}/z"]


def _spec(template: str) -> Spec:
    names = re.findall(r"\{([^{}/]+)\}", template)
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
              for n in names]
    doc = {"openapi": "3.1.0", "info": {"title": "t", "version": "1"},
           "paths": {template: {"get": {"operationId": "op", "responses": {},
                                        "parameters": params}}}}
    return compile_spec(doc, name="t", file="t.yaml")


def _backtracking(template: str) -> re.Pattern[str]:
    """Each parameter a lazy `([^/]+?)`, as before: the reference."""
    return re.compile("/" + "/".join(re.sub(r"\\\{[^{}/]+\\\}", "([^/]+?)", re.escape(s))
                                     for s in template.split("/")[1:]))


SPECS = [(t, _spec(t), _backtracking(t)) for t in TEMPLATES]


@given(st.lists(st.sampled_from([*"ab.-xyz/", ".json", "..", "/f/"]), max_size=14).map("".join))
def test_the_same_paths_match_with_the_same_captures(tail: str) -> None:
    for template, spec, reference in SPECS:
        for path in (tail, "/f/" + tail):
            expected = reference.fullmatch(path)
            found = spec.find("GET", path)
            assert (found and tuple(v for _, v in found.path_params)) == \
                (expected and expected.groups()), (template, path)


@pytest.mark.parametrize("template", ["/f/{a}.{b}.json", "/f/{a}.{b}.{c}"])
def test_a_megabyte_segment_that_almost_matches_completes(template: str) -> None:
    spec = _spec(template)
    assert spec.find("GET", "/f/" + "a." * 500_000 + "x/") is None
    found = spec.find("GET", "/f/" + "a." * 500_000 + "json")
    assert found is not None and found.path_params[0] == ("a", "a")
