"""fsha.tomlout: what it writes, tomllib reads back as the same values."""

from __future__ import annotations

import tomllib
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fsha.tomlout import dumps

scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.text(st.characters(exclude_categories=("Cs",))))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(min_size=1, max_size=8), inner,
                                                 max_size=4)), max_leaves=10)
names = st.text(min_size=1, max_size=10)


class DumpsTests(SynchronousTestCase):
    def test_a_cluster_config_shape(self) -> None:
        doc: dict[str, Any] = {
            "cluster": {"name": "demo", "secret_file": '/tmp/a "quoted" path\\x',
                        "heartbeat_interval_ms": 20, "quorum": "majority"},
            "fencing": {"command": ["/bin/fence", "--node", "{node}"], "required": True},
            "network": [{"name": "A", "port": 9000}, {"name": "B", "port": 9001}],
            "node": [{"name": "fs1", "address": {"A": "127.0.1.1", "B": "127.0.2.1"},
                      "esl": {"host": "127.0.0.1", "port": 8021, "timeout_ms": 1000}}],
            "slot": [{"name": "s1", "ip": [{"address": "10.0.0.1/32", "interface": "lo"}]}],
        }
        text = dumps(doc, header="written by a test")
        self.assertTrue(text.startswith("# written by a test\n"))
        self.assertIn("[[node]]\n", text)
        self.assertEqual(tomllib.loads(text), doc)

    @given(st.dictionaries(names, values, max_size=4),
           st.dictionaries(names, st.dictionaries(names, values, min_size=1, max_size=3),
                           max_size=3))
    def test_round_trip(self, top: dict[str, Any], tables: dict[str, Any]) -> None:
        top = {k: v for k, v in top.items() if not isinstance(v, dict)
               and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
        doc = {**top, **{k: v for k, v in tables.items() if k not in top}}
        self.assertEqual(tomllib.loads(dumps(doc)), doc)
