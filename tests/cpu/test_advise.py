"""dwdp_comm.bench.advise: shapes, loads, the prediction's formulas, the choice, and ``dwdp-bench advise``."""

import json
import math

import pytest

from dwdp_comm.bench import advise as A
from dwdp_comm.bench import advise_cli, fabric_measure
from dwdp_comm.bench import fabric as F
from dwdp_comm.bench import model as M
from dwdp_comm.bench.cli import main
from dwdp_comm.bench.patterns import make_plans, parse_schedule
from dwdp_comm.errors import InvalidArgumentError

H100 = "NVIDIA H100 80GB HBM3"  # torch.cuda.get_device_name() of an H100 SXM
H200 = "NVIDIA H200"


@pytest.fixture(autouse=True)
def _gpu_name(request, monkeypatch):
    """CPU tests see no GPU when advise picks a fabric (on a GPU machine too); a test fakes one with
    ``monkeypatch.setattr(F, "local_gpu_name", ...)``."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(F, "local_gpu_name", lambda: None)

TINY_MLA = dict(name="tiny-mla", hidden=64, moe_intermediate=32, num_experts=8, top_k=2, num_shared_experts=1,
                num_layers=3, attention="mla", num_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_dim=8,
                qk_rope_dim=8, v_head_dim=8)
TINY_GQA = dict(name="tiny-gqa", hidden=64, moe_intermediate=32, num_experts=8, top_k=2, num_layers=2,
                attention="gqa", num_heads=4, num_kv_heads=2, head_dim=16)


# ---- shapes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(A.PRESETS))
def test_presets_build(name):
    s = A.get_shape(name)
    assert s.top_k <= s.num_experts and s.attention in ("mla", "gqa")


def test_deepseek_preset_matches_library_config():
    from dwdp_comm.moe import DEEPSEEK_V3 as c
    s = A.get_shape("deepseek-v3")
    assert (s.hidden, s.moe_intermediate, s.num_experts, s.top_k, s.attention) == \
        (c.hidden, c.moe_intermediate, c.num_experts, c.top_k, "mla")
    assert s.expert_nbytes("bf16") == 3 * 7168 * 2048 * 2
    # fp8: one byte a weight and float32 scales per output channel of w13 and w2
    assert s.expert_nbytes("fp8") == 3 * 7168 * 2048 + 4 * (2 * 2048 + 7168)


def test_hf_config_deepseek_style(tmp_path):
    cfg = {"hidden_size": 7168, "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8,
           "n_shared_experts": 1, "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128,
           "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
           "v_head_dim": 128}
    p = tmp_path / "dsv3" / "config.json"
    p.parent.mkdir()
    p.write_text(json.dumps(cfg))
    s = A.get_shape(str(p))
    ref = A.get_shape("deepseek-v3")
    assert s.attention == "mla" and s.num_layers == 58
    assert s.attention_params() == ref.attention_params()
    assert s.expert_nbytes("bf16") == ref.expert_nbytes("bf16")


def test_hf_config_qwen_style(tmp_path):
    cfg = {"hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
           "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    s = A.get_shape(str(p))
    assert s.attention == "gqa" and (s.num_kv_heads, s.head_dim, s.num_layers) == (4, 128, 48)
    q = A.get_shape("qwen3-30b-a3b")
    assert (s.hidden, s.moe_intermediate, s.num_experts, s.top_k) == (q.hidden, q.moe_intermediate, q.num_experts,
                                                                       q.top_k)
    # GQA projections: q and o of nh x hd, k and v of nkv x hd
    assert s.attention_params() == 2048 * 32 * 128 * 2 + 2 * 2048 * 4 * 128


def test_hf_config_not_moe_names_missing_keys(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"hidden_size": 4096, "num_attention_heads": 32}))
    with pytest.raises(InvalidArgumentError, match="moe_intermediate_size"):
        A.get_shape(str(p))


def test_unknown_model_names_presets():
    with pytest.raises(InvalidArgumentError, match="model.*deepseek-v3"):
        A.get_shape("no-such-model")


def test_bad_shape_field():
    with pytest.raises(InvalidArgumentError, match="top_k"):
        A.get_shape({**TINY_GQA, "top_k": 9})


# ---- load ---------------------------------------------------------------------------------------------
def test_load_mean_and_spread():
    ld = A.load_from(8, 1000, 0.3)
    assert abs(ld.mean - 1000) <= 1  # symmetric quantiles: the asked mean, up to rounding
    assert list(ld.tokens) == sorted(ld.tokens) and ld.tokens[0] < 1000 < ld.tokens[-1]
    sd = math.sqrt(sum((t - ld.mean) ** 2 for t in ld.tokens) / 8)
    assert 0.2 < sd / ld.mean < 0.3  # quantiles of 8 points under-spread a normal a little
    assert A.load_from(4, 500, 0.0).tokens == (500,) * 4


def test_load_errors():
    with pytest.raises(InvalidArgumentError, match="tokens"):
        A.load_from(4, tokens=[1, 2, 3])
    with pytest.raises(InvalidArgumentError, match="cv"):
        A.load_from(4, 100, -0.1)
    with pytest.raises(InvalidArgumentError, match="mean"):
        A.load_from(4, 0)


def test_seq_lens_split():
    assert A.Load((10,), 4).seq_lens(10) == [4, 4, 2]
    assert A.Load((10,), None).seq_lens(10) == [10]


# ---- compute --------------------------------------------------------------------------------------------
def test_modelled_compute_reproduces_its_calibration():
    # 2 DeepSeek-V3 layers, 16K tokens as two 8K prompts: 146 ms on one H200 (the calibration point)
    s = A.get_shape("deepseek-v3")
    c = A.modelled_compute(s, [16384], A.Load((16384,), 8192))
    assert 2 * sum(c.points[16384].values()) == pytest.approx(0.146, rel=0.01)
    assert c.source == "modelled"


def test_compute_costs_interpolate_between_points():
    c = A.ComputeCosts({100: {"x": 1.0}, 300: {"x": 5.0}})
    assert c.at(100, "x") == 1.0 and c.at(300, "x") == 5.0
    assert c.at(200, "x") == pytest.approx(3.0)
    assert c.at(400, "x") == pytest.approx(7.0)  # extrapolates along the last segment
    assert A.ComputeCosts({50: {"x": 2.0}}).at(100, "x") == pytest.approx(4.0)  # one point: proportional


@pytest.mark.parametrize("shape,weights", [(TINY_MLA, "bf16"), (TINY_GQA, "fp8")])
def test_measure_compute_on_cpu(shape, weights):
    s = A.get_shape(shape)
    c = A.measure_compute(s, [8, 32], A.Load((8, 32), 16), weights, device="cpu")
    assert c.source == "measured" and sorted(c.points) == [8, 32]
    for p in c.points.values():
        assert set(p) == {"attention_s", "experts_s", "other_s"} and all(v > 0 for v in p.values())


# ---- prefetch and prediction --------------------------------------------------------------------------------
def test_prefetch_whole_copy_swap_at_duplex_cap():
    # G=2 "full" is a swap: each GPU sends and receives at once, so half the duplex cap each way
    fab = A.fabric_for(2, link_GBps=100.0)
    assert fab.duplex_Bps == pytest.approx(2 * 100e9 * 386 / 394)
    n = 64 << 20
    want = fab.copy_overhead_s + n / (fab.duplex_Bps / 2)
    assert A.prefetch_seconds(fab, n, "parallel", 0) == pytest.approx(want, rel=1e-6)
    assert A.prefetch_seconds(A.fabric_for(1), n, "parallel", 0) == 0.0


def test_fabric_for_errors_and_defaults():
    assert A.fabric_for(4).name == "h200x4" and A.fabric_for(72).name == "nvl72x72"
    with pytest.raises(InvalidArgumentError, match="fabric"):
        A.fabric_for(4, "nvlink9")
    with pytest.raises(InvalidArgumentError, match="link_GBps"):
        A.fabric_for(4, link_GBps=0)


# ---- fabrics ---------------------------------------------------------------------------------------------------
def test_fabric_presets_basis_and_numbers():
    # h200 is the measured table's fit (DEVICE_NOTES.md): these are the numbers the model was calibrated with
    h = F.h200(4)
    assert (h.egress_Bps, h.duplex_Bps, h.local_Bps, h.copy_overhead_s, h.harness_copy_overhead_s) == \
        (394e9, 772e9, 2.06e12, 3.9e-6, 8.5e-6)
    assert F.preset_info("h200")["basis"] == "measured"
    for name in ("h100", "b200", "nvl72"):
        info = F.preset_info(name)
        assert info["basis"] == "published" and info["sources"]
    # H100 SXM: the links of H200 (NVLink4, 18 x 26.56 GB/s), HBM3 3.35 TB/s against 4.8
    assert "18 links x 26.56 GB/s" in " ".join(F.preset_info("h100")["sources"])
    assert F.h100(4).pair_Bps == h.pair_Bps and F.h100(4).local_Bps == pytest.approx(2.06e12 * 3.35 / 4.8, rel=0.01)
    # NVLink5: 1.8 TB/s bidirectional = 900 GB/s a direction, at H200's measured fraction of nominal
    for f in (F.b200(8), F.nvl72(72)):
        assert f.pair_Bps == pytest.approx(900e9 * 394 / 478)
        assert f.duplex_Bps == pytest.approx(2 * f.pair_Bps * 386 / 394)
    assert M.h200 is F.h200 and M.Fabric is F.Fabric  # the model still offers them


@pytest.mark.parametrize("name,want", [(H100, "h100"), ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
                                       (H200, "h200"), ("NVIDIA H200 NVL", None), ("NVIDIA GH200 480GB", None),
                                       ("NVIDIA B200", "b200"), ("NVIDIA GB200", "nvl72"),
                                       ("NVIDIA A100-SXM4-80GB", None)])
def test_detect_preset(name, want):
    assert F.detect_preset(name) == want


def test_choose_fabric_says_which_and_why():
    c = F.choose_fabric("auto", 4, device_name=H100)
    assert (c.fabric.name, c.basis, c.borrowed) == ("h100x4", "published", False)
    assert "published link rates, not measured" in c.text and repr(H100) in c.text
    c = F.choose_fabric("auto", 4, device_name=H200)
    assert (c.fabric.name, c.basis, c.borrowed) == ("h200x4", "measured", False)
    assert "measured on this GPU kind" in c.text
    c = F.choose_fabric("auto", 4, device_name="NVIDIA A100-SXM4-80GB")
    assert c.borrowed and c.fabric.name == "h200x4" and "borrowed from h200x4 because no fabric is known" in c.text
    c = F.choose_fabric("auto", 16, device_name=H100)  # beyond an HGX board: the one larger NVLink domain
    assert c.borrowed and c.fabric.name == "nvl72x16" and "exceeds its NVLink domain of 8 GPUs" in c.text
    c = F.choose_fabric("h200", 4, device_name=H100)
    assert c.borrowed and "this GPU is 'NVIDIA H100 80GB HBM3', so its numbers are borrowed" in c.text
    c = F.choose_fabric("auto", 4, device_name=None, detect=False)
    assert c.fabric.name == "h200x4" and not c.borrowed and "no GPU visible here" in c.text
    with pytest.raises(InvalidArgumentError, match="fabric: got 'nvlink9'.*h100"):
        F.choose_fabric("nvlink9", 4, device_name=None, detect=False)


@pytest.mark.parametrize("gpu,name,basis", [(H100, "h100x4", "published link rates, not measured"),
                                            (H200, "h200x4", "measured on this GPU kind")])
def test_cli_names_the_fabric_of_its_gpu(gpu, name, basis, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(F, "local_gpu_name", lambda: gpu)
    out = tmp_path / "a.json"
    assert main(["advise", "-m", "qwen3-30b-a3b", "-g", "4", "--measure", "no", "--fabric", "auto", "--sweep", "4096",
                 "-c", "0", "-s", "parallel", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if l.startswith("# fabric:"))
    assert line.startswith(f"# fabric: {name}: {basis}") and f"this GPU is {gpu!r}" in line
    assert f"prefetch: modelled: contention model (dwdp_comm.bench.model, per_stream executor) on {name}" in text
    # modelled compute is one H200's rate: said on any other GPU
    assert ("one H200's rate" in text) == (gpu != H200)
    doc = json.loads(out.read_text())
    assert doc["inputs"]["fabric"]["name"] == name and doc["inputs"]["fabric_choice"]["device_name"] == gpu
    assert doc["inputs"]["fabric_choice"]["borrowed"] is False


def _synthetic_measurement(truth: "F.Fabric", gpu: str, n: int = 1 << 30, chunk: int = 8 << 20) -> dict:
    """What measure_local would time on ``truth``: the model's own pair, chunked pair and swap."""
    def t(pattern, c):
        sch = parse_schedule("naive")
        return M.simulate(make_plans(pattern, sch, 2, n, c), truth, options=sch.engine_options(2)).makespan
    return {"gpu": gpu, "gpus": 2, "peer": True, "nbytes": n, "chunk_nbytes": chunk, "n_chunks": n // chunk,
            "iters": 5, "whole_s": t("pair", 0), "chunked_s": t("pair", chunk), "swap_s": t("swap", 0),
            "local_s": truth.copy_overhead_s + n / truth.local_Bps}


def test_fit_fabric_inverts_the_model():
    truth = F.h100(2).with_(egress_Bps=350e9, ingress_Bps=350e9, duplex_Bps=600e9, local_Bps=1.5e12,
                            copy_overhead_s=5e-6)
    fab, prov = fabric_measure.fit_fabric(_synthetic_measurement(truth, H100))
    for k in ("egress_Bps", "ingress_Bps", "duplex_Bps", "local_Bps", "copy_overhead_s"):
        assert getattr(fab, k) == pytest.approx(getattr(truth, k), rel=1e-6), k
        assert prov[k].startswith("measured")
    assert prov["flag_latency_s"].startswith("from h100") and fab.flag_latency_s == truth.flag_latency_s
    # one GPU: no peer link measured, the link caps come from the base preset
    one = {**_synthetic_measurement(truth, H100), "peer": False, "gpus": 1, "swap_s": None}
    fab1, prov1 = fabric_measure.fit_fabric(one, "h200")
    assert fab1.egress_Bps == 394e9 and "one GPU: no peer link" in prov1["egress_Bps"]


def test_calibrate_write_then_advise_fabric_file_round_trip(tmp_path, monkeypatch, capsys):
    # the fit takes a batch call and a graph node to cost one copy (as on H200): so does this truth
    truth = F.h100(2).with_(egress_Bps=350e9, ingress_Bps=350e9, duplex_Bps=600e9, local_Bps=1.5e12,
                            copy_overhead_s=5e-6, batch_call_overhead_s=5e-6, graph_copy_overhead_s=5e-6)
    monkeypatch.setattr(fabric_measure, "measure_local", lambda nbytes, iters: _synthetic_measurement(truth, H100))
    path = tmp_path / "fabric_h100.json"
    assert main(["calibrate", "--write", str(path)]) == 0
    text = capsys.readouterr().out
    assert "egress_Bps" in text and "350.0 GB/s" in text and f"wrote {path}" in text
    fab, doc = F.load_fabric_file(str(path), 4)
    assert doc["gpu"] == H100 and doc["base"] == "h100" and doc["date"].startswith("20") and "commit" in doc
    for k in ("egress_Bps", "duplex_Bps", "local_Bps", "copy_overhead_s"):
        assert getattr(fab, k) == pytest.approx(getattr(truth, k), rel=1e-6)
    assert (fab.group_size, fab.name) == (4, "h100-measuredx4")
    out = tmp_path / "a.json"
    assert main(["advise", "-m", "qwen3-30b-a3b", "-g", "4", "--measure", "no", "--fabric", str(path), "--sweep",
                 "4096", "-c", "0", "-s", "parallel", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"fabric: h100-measuredx4: measured on {H100!r} (2 GPUs) by dwdp-bench calibrate" in text
    assert "link: fabric h100-measuredx4: 350 GB/s pair" in text
    res = json.loads(out.read_text())
    assert res["inputs"]["fabric"]["duplex_Bps"] == pytest.approx(600e9)
    assert res["inputs"]["fabric_choice"]["basis"] == "file"
    # the file's fabric gives the prefetch the model gives the truth
    per_source = res["point"]["prefetch_s"]
    assert per_source == pytest.approx(A.prefetch_seconds(truth.with_(group_size=4), 128 * 768 * 2048 * 3 * 2 // 4,
                                                          "parallel", 0), rel=1e-6)


def test_fabric_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(InvalidArgumentError, match="fabric: .*dwdp-bench/fabric/v1"):
        F.choose_fabric(str(bad), 4, device_name=None, detect=False)
    bad.write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="readable fabric file"):
        F.load_fabric_file(str(bad), 4)
    assert main(["advise", "--measure", "no", "--fabric", "nvlink9"]) == 2
    assert "fabric: got 'nvlink9'" in capsys.readouterr().err


def test_predict_point_formulas():
    s = A.get_shape(TINY_GQA)
    costs = A.ComputeCosts({100: {"attention_s": 1e-3, "experts_s": 2e-3, "other_s": 0.5e-3}}, interference=1.1)
    ld = A.Load((100, 300))
    link = 1e9
    p = A.predict_point(s, ld, costs, prefetch_s=5e-3, link_Bps=link, a2a_efficiency=0.5, a2a_latency_s=0,
                        sync_s=0)
    c0, c1 = 3.5e-3 * 1.1, 10.5e-3 * 1.1
    assert p["dwdp_layer_s"] == pytest.approx([5e-3, c1])
    assert p["dwdp_exposed_s"] == pytest.approx([5e-3 - c0, 0.0])
    send = 300 * 2 * 0.5 * 64 * 2  # the busiest sender: top-2 rows, half remote, bf16
    recv = 400 * 2 / 2 * 0.5 * 64 * 2
    a2a = 2 * max(send, recv) / (0.5 * link)
    assert p["dep_all_to_all_s"] == pytest.approx(a2a)
    dep = 4.5e-3 + 2e-3 * 2 + a2a  # slowest attention (300 tokens) + experts at the mean 200 tokens
    assert p["dep_layer_s"] == pytest.approx(dep)
    assert p["dep_wait_s"] == pytest.approx([3e-3, 0.0])
    assert p["speedup"] == pytest.approx(((100 / 5e-3 + 300 / c1) / 2) / (200 / dep))


def test_advise_tiny_modelled_and_breakeven():
    res = A.advise(TINY_MLA, 4, measure="no", mean_tokens=256, cv=0.3, seq_len=64, sweep=[64, 256, 1024, 4096, 16384],
                   chunks=[0], schedules=["parallel", "round_robin"], tflops=0.5)
    assert res["sources"]["compute"].startswith("modelled") and res["sources"]["link"].startswith("fabric h200x4")
    assert {r["cv"] for r in res["sweep"]} == {0.0, 0.3}
    assert res["choice"]["schedule"] in ("parallel", "round_robin") and res["choice"]["depth"] in (2, 3)
    for cv, be in res["breakeven_tokens"].items():
        rows = [r for r in res["sweep"] if r["cv"] == float(cv)]
        if be is None:
            assert all(r["speedup"] < 1 for r in rows)
        else:  # DWDP loses below the break-even point of the curve, not above it
            below = [r for r in rows if r["mean_tokens"] < be * 0.999]
            assert all(r["speedup"] < 1 for r in below)
    mem = res["memory"]
    assert mem["local_experts"] == 2 and mem["dep_nbytes"] == 2 * mem["expert_nbytes"] * 3
    assert mem["dwdp_nbytes"] == mem["dep_nbytes"] + res["choice"]["depth"] * 6 * mem["expert_nbytes"]
    json.dumps(res)  # JSON-ready


def test_advise_measured_on_cpu_says_so():
    res = A.advise(TINY_GQA, 2, measure="cpu", mean_tokens=32, cv=0.0, seq_len=16, sweep=[16, 64], chunks=[0],
                   schedules=["parallel"], depths=[2], link_GBps=50.0)
    assert res["sources"]["compute"].startswith("measured") and res["sources"]["link"] == "given: 50 GB/s"
    assert res["choice"]["depth"] == 2


def test_advise_given_interference_overrides():
    res = A.advise(TINY_GQA, 2, measure="no", mean_tokens=32, sweep=[32], chunks=[0], schedules=["parallel"],
                   interference=1.25)
    assert res["interference"] == 1.25 and "given" in res["sources"]["interference"]
    with pytest.raises(InvalidArgumentError, match="interference"):
        A.advise(TINY_GQA, 2, measure="no", mean_tokens=32, sweep=[32], chunks=[0], interference=0.5)


@pytest.mark.parametrize("kw,name", [({"weights": "int4"}, "weights"), ({"measure": "maybe"}, "measure"),
                                     ({"depths": [0]}, "depths"), ({"schedules": ["warp"]}, "schedule"),
                                     ({"a2a_efficiency": 2.0}, "a2a_efficiency")])
def test_advise_argument_errors(kw, name):
    with pytest.raises(InvalidArgumentError, match=name):
        A.advise(TINY_GQA, 2, **{"measure": "no", **kw})


# ---- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "a.json"
    rc = main(["advise", "-m", "qwen3-30b-a3b", "-g", "4", "--measure", "no", "-t", "4096", "--cv", "0.2",
               "--sweep", "1024,8192", "-c", "0", "-s", "parallel", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    head = [i for i, l in enumerate(lines) if l.startswith("#") and "tok/rank" in l]
    assert head and "(ms)" in lines[head[0] + 1] and "(tok/s/GPU)" in lines[head[0] + 1]
    rows = [l for l in lines[head[0] + 2:] if not l.startswith("#")]
    assert len(rows) == 4  # 2 CVs x 2 token counts
    assert "compute: modelled" in text and "link: fabric h200x4: 394 GB/s pair" in text
    doc = json.loads(out.read_text())
    assert doc["schema"] == A.SCHEMA and doc["group_size"] == 4 and len(doc["sweep"]) == 4
    assert doc["date"].startswith("20") and doc["machine"] and "commit" in doc  # the run record


def test_cli_explicit_shape(capsys):
    rc = main(["advise", "--hidden", "64", "--intermediate", "32", "--experts", "8", "--top-k", "2", "-g", "2",
               "--measure", "no", "-t", "64", "--sweep", "64", "-c", "0", "-s", "parallel"])
    assert rc == 0 and "explicit (8 experts, top-2" in capsys.readouterr().out


def test_cli_argument_errors(capsys):
    assert main(["advise", "-g", "0", "--measure", "no"]) == 2
    assert "group_size: got 0" in capsys.readouterr().err
    assert main(["advise", "--hidden", "64", "--measure", "no"]) == 2
    assert "all four" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["advise", "--cvs", "x"])
    assert e.value.code == 2 and "--cvs" in capsys.readouterr().err


def test_cli_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    def no_mpl(res, path):
        raise ImportError("No module named 'matplotlib'")
    monkeypatch.setattr(A, "plot_speedup", no_mpl)
    out = tmp_path / "a.json"
    rc = main(["advise", "-g", "2", "-m", TINY_JSON(tmp_path), "--measure", "no", "-t", "64", "--sweep", "64",
               "-c", "0", "-s", "parallel", "--json", str(out), "--plot", str(tmp_path / "a.png")])
    assert rc == advise_cli.EXIT_NO_MATPLOTLIB
    assert "matplotlib" in capsys.readouterr().err and out.exists()


def TINY_JSON(tmp_path):
    p = tmp_path / "tiny" / "config.json"
    p.parent.mkdir(exist_ok=True)
    p.write_text(json.dumps({"hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 8,
                             "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    return str(p)


def test_plot_written_when_matplotlib_present(tmp_path):
    pytest.importorskip("matplotlib")
    res = A.advise(TINY_GQA, 2, measure="no", mean_tokens=64, sweep=[64, 128], chunks=[0], schedules=["parallel"])
    p = tmp_path / "s.png"
    A.plot_speedup(res, str(p))
    assert p.stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["bf16", "fp8"])
@pytest.mark.parametrize("shape", [TINY_MLA, TINY_GQA])
def test_advise_measures_on_gpu(shape, weights):
    res = A.advise(shape, 2, weights=weights, measure="yes", mean_tokens=64, cv=0.2, seq_len=32, sweep=[32, 128],
                   chunks=[0], schedules=["parallel"])
    assert res["sources"]["compute"].startswith("measured")
    assert res["interference"] >= 1.0
    for p in res["compute_points"].values():
        assert all(v > 0 for v in p.values())


@pytest.mark.gpu
def test_advise_on_gpu_names_its_gpu_and_fabric():
    import torch
    name = torch.cuda.get_device_name()
    res = A.advise(TINY_GQA, 2, measure="yes", mean_tokens=64, cv=0.0, seq_len=32, sweep=[64], chunks=[0],
                   schedules=["parallel"], fabric="auto")
    fc = res["inputs"]["fabric_choice"]
    assert fc["device_name"] == name and repr(name) in res["sources"]["fabric"]
    kind = F.detect_preset(name)
    assert fc["borrowed"] == (kind is None) and res["inputs"]["fabric"]["name"].startswith(kind or "h200")


@pytest.mark.gpu
def test_calibrate_write_measures_this_gpu(tmp_path):
    import torch
    from dwdp_comm.bench import calibrate
    path = tmp_path / "fabric.json"
    doc = calibrate.write_fabric(str(path), nbytes=256 << 20, iters=3)
    fab, back = F.load_fabric_file(str(path), 2)
    assert back["gpu"] == torch.cuda.get_device_name() and back["gpus_measured"] == min(2, torch.cuda.device_count())
    assert fab.local_Bps > 1e11 and 0 <= fab.copy_overhead_s < 1e-4  # loose sanity: a copy engine, microseconds
    if doc["gpus_measured"] == 2:
        assert fab.pair_Bps > 1e10 and doc["provenance"]["egress_Bps"].startswith("measured")
