"""benchmarks.logits_blocks at tiny size: every variant timed, the speedups and the best block."""

import json

from benchmarks import logits_blocks


def test_logits_blocks_times_every_variant_and_names_the_fastest(tmp_path, capsys):
    out = tmp_path / "blocks.json"
    result = logits_blocks.main(["--batch-sizes", "64,128", "--blocks", "0,16,100",
                                 "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["ms_per_call"]["64"]) == {"autodiff", "fused/0", "fused/16"}  # 100 >= B
    assert set(result["ms_per_call"]["128"]) == {"autodiff", "fused/0", "fused/16", "fused/100"}
    for b in ("64", "128"):
        ms = result["ms_per_call"][b]
        assert all(v > 0 for v in ms.values())
        speed = result["speedup_vs_autodiff"][b]
        assert speed["fused/0"] == ms["autodiff"] / ms["fused/0"]
        best = result["best_block"][b]
        assert ms[best] == min(v for k, v in ms.items() if k != "autodiff")
    assert result["default_block"] == {"64": 0, "128": 0}
