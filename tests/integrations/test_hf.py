"""Hugging Face ``transformers`` models: sites, tracing, pruning and collapse on tiny configs.

Every model is built from a config with random weights (nothing is downloaded). The
activation classes are the library's own (``GELUActivation``, ``NewGELUActivation``,
``SiLUActivation``), recognised by probing, not by name.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import egp_fast  # noqa: E402
from egp_fast.graph import discover_sites, trace  # noqa: E402

VOCAB = 100


def _bert(**kw):
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=VOCAB, **kw)
    return transformers.BertForSequenceClassification(cfg).eval()


def _vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=16, patch_size=8, num_labels=3)
    return transformers.ViTForImageClassification(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama(mlp_bias=False):
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                   bos_token_id=0, eos_token_id=0, mlp_bias=mlp_bias)
    return transformers.LlamaForCausalLM(cfg).eval()


def _text_batch(n=4, length=9, labels=None, pad=True):
    mask = torch.ones(n, length, dtype=torch.long)
    if pad:
        mask[1, length - 3:] = 0  # a padded sequence: the mask must reach the attention
    b = {"input_ids": torch.randint(0, VOCAB, (n, length)), "attention_mask": mask}
    if labels is not None:
        b["labels"] = labels
    return b


def _image_batch(n=4, labels=False):
    b = {"pixel_values": torch.randn(n, 3, 16, 16)}
    if labels:
        b["labels"] = torch.randint(0, 3, (n,))
    return b


# name -> (builder, batch builder, MLP first layer of block i, activation module of block i)
MODELS = {
    "bert": (_bert, _text_batch, "bert.encoder.layer.{}.intermediate.dense",
             "bert.encoder.layer.{}.intermediate.intermediate_act_fn"),
    "vit": (_vit, _image_batch, "vit.layers.{}.mlp.fc1", "vit.layers.{}.mlp.activation_fn"),
    "gpt2": (_gpt2, _text_batch, "transformer.h.{}.mlp.c_fc", "transformer.h.{}.mlp.act"),
    "llama": (_llama, _text_batch, "model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.act_fn"),
}


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def _out(model, batch):
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**batch).logits


def _mlp_names(model, name):
    """Fall back to the old ViT layout (encoder.layer.i.intermediate) on older transformers."""
    _, _, prod, act = MODELS[name]
    names = dict(model.named_modules())
    if name == "vit" and prod.format(0) not in names:
        return "vit.encoder.layer.{}.intermediate.dense", "vit.encoder.layer.{}.intermediate.intermediate_act_fn"
    return prod, act


@pytest.mark.parametrize("name", list(MODELS))
def test_sites_are_the_mlp_activations_with_their_producers(name):
    build, batch, _, _ = MODELS[name]
    model = build()
    g = _quiet(discover_sites, model, batch())
    prod, act = _mlp_names(model, name)
    assert g.traced, "the transformers tracer should trace this model"
    assert [s.name for s in g.sites] == [act.format(i) for i in range(2)]
    assert [s.producers for s in g.sites] == [[prod.format(i)] for i in range(2)]
    assert all(s.channel_dim == -1 and s.kind in ("gelu", "silu") and not s.exact for s in g.sites)
    assert g.sites[0].channels == (128 if name == "gpt2" else 64)


def test_gpt2_conv1d_is_a_weight_layer():
    model = _gpt2()
    layers = egp_fast.weight_layers(model)
    for part in ("c_fc", "c_proj", "c_attn"):
        assert f"transformer.h.0.mlp.{part}" in layers or f"transformer.h.0.attn.{part}" in layers
    assert isinstance(model.transformer.h[0].mlp.c_fc, egp_fast.graph.WEIGHT_TYPES)
    assert not isinstance(model.transformer.wte, egp_fast.graph.WEIGHT_TYPES)


@pytest.mark.parametrize("name", list(MODELS))
def test_traced_model_gives_the_same_outputs_on_other_shapes(name):
    build, batch, _, _ = MODELS[name]
    model = build()
    example = batch()
    gm = _quiet(trace, model, list(example), example)
    # another batch size and (for text) another length and padding than the traced example
    other = batch(3, 6) if batch is _text_batch else batch(3)
    ref = model(**other)
    got = gm(**other)
    assert type(got) is type(ref)  # ModelOutput rebuilt: .logits works
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_traced_model_survives_deepcopy_save_load_and_backward(name, tmp_path):
    import copy

    build, batch, _, _ = MODELS[name]
    model = build()
    example = batch()
    gm = _quiet(trace, model, list(example), example)
    ref = _out(model, example)
    torch.save(gm, tmp_path / "gm.pt")
    loaded = _quiet(torch.load, tmp_path / "gm.pt", weights_only=False)  # re-traces the code
    for other in (copy.deepcopy(gm), loaded):
        torch.testing.assert_close(_out(other, example), ref, rtol=0, atol=1e-6)
        assert type(other(**example)) is type(model(**example))
    gm.train()
    gm(**example).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "intermediate" in n or "mlp" in n)


def test_bert_mask_reaches_the_traced_attention():
    model = _bert()
    example = _text_batch()
    gm = _quiet(trace, model, list(example), example)
    unmasked = {"input_ids": example["input_ids"], "attention_mask": torch.ones_like(example["attention_mask"])}
    assert not torch.allclose(_out(gm, example)[1], _out(gm, unmasked)[1])
    torch.testing.assert_close(_out(gm, example), _out(model, example), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["egp", "imp"])
def test_one_round_reaches_half_sparsity_with_dict_batches(name, method):
    build, batch, _, _ = MODELS[name]
    model = build()
    labels = torch.zeros(4, dtype=torch.long)
    data = [batch(labels=labels) if batch is _text_batch else batch(labels=True) for _ in range(2)]
    res = _quiet(egp_fast.prune, model, data, iterations=1, method=method, progress=False)
    prod, _ = _mlp_names(model, name)
    layers = egp_fast.masked_layers(model)
    if method == "egp":
        assert sorted(layers) == sorted(prod.format(i) for i in range(2))
    else:
        assert set(layers) == set(egp_fast.weight_layers(model))
    total = sum(m.weight_mask.numel() for m in layers.values())
    kept = sum(int(m.weight_mask.sum()) for m in layers.values())
    assert abs((1 - kept / total) - 0.5) < 1e-3
    assert res.rounds[0].sparsity == pytest.approx(0.5, abs=1e-3)
    for m in layers.values():  # the masks are applied to the weights
        assert bool((m.weight[~m.weight_mask] == 0).all())


def test_tensor_batches_for_vit():
    model = _vit()
    x = torch.randn(4, 3, 16, 16)
    g = _quiet(discover_sites, model, x)
    assert g.traced and len(g.sites) == 2
    stats = _quiet(egp_fast.measure_entropy, model, [x, x], progress=False)
    assert len(stats.sites) == 2 and all(0 < s.entropy <= 1 for s in stats.sites.values())


def test_conv1d_masks_survive_training():
    model = _gpt2()
    batch = _text_batch(pad=False)
    _quiet(egp_fast.prune, model, [batch], iterations=1, method="imp", progress=False)
    c_fc = model.transformer.h[0].mlp.c_fc
    assert c_fc.weight.shape == (32, 128)  # Conv1D: [in, out]
    pruned = ~c_fc.weight_mask
    assert pruned.any()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(2):
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert bool((c_fc.weight[pruned] == 0).all())


def _force(model, name, signs):
    """Bias of each block's first MLP layer far positive (+) or negative (-): zero entropy."""
    prod, _ = _mlp_names(model, name)
    with torch.no_grad():
        for i, sign in enumerate(signs):
            if sign:
                layer = model.get_submodule(prod.format(i))
                layer.weight.mul_(0.01)
                layer.bias.fill_(40.0 * sign)


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_collapse_folds_forced_mlp_activations_exactly(name):
    build, batch, _, _ = MODELS[name]
    model = build()
    _force(model, name, [+1, -1])  # block 0 always ON (identity), block 1 always OFF (zero)
    data = [batch() for _ in range(2)]
    example = data[0]
    stats = _quiet(egp_fast.measure_entropy, model, data, progress=False)
    assert all(s.collapsible for s in stats.sites.values())
    out = _quiet(egp_fast.collapse, model, stats, example, measure_latency=False, max_flip=1.0)
    _, act = _mlp_names(model, name)
    assert {e["site"] for e in out.removed if e.get("kind") == "linearize"} == {act.format(0), act.format(1)}
    assert out.after["sites"] == 0
    assert out.after["weight_layers"] < out.before["weight_layers"], out.removed + out.left
    for b in [example, batch(3, 5) if batch is _text_batch else batch(3)]:
        ref, got = _out(model, b), _out(out.model, b)
        # GELU at |z| >= 40 is the identity / zero to float32 rounding: the folds are exact here
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_collapse_gelu_approximation_is_measured_and_labelled():
    model = _bert()
    prod, _ = _mlp_names(model, "bert")
    with torch.no_grad():
        layer = model.get_submodule(prod.format(0))
        layer.weight.mul_(0.01)
        layer.bias.fill_(2.5)  # always ON, but GELU(2.5) = 0.984 * 2.5: not the identity
    data = [_text_batch() for _ in range(2)]
    stats = _quiet(egp_fast.measure_entropy, model, data, progress=False)
    site = MODELS["bert"][3].format(0)
    kept = _quiet(egp_fast.collapse, model, stats, data[0], measure_latency=False, max_flip=1.0, sites=[site])
    assert kept.removed_sites == [] and kept.exact  # exact=True (the default) leaves it, and says why
    (why,) = [e for e in kept.left if e.get("kind") == "approximate"]
    assert why["site"] == site and 0.01 < why["gap"] < 0.1 and "exact=False" in why["reason"]
    out = _quiet(egp_fast.collapse, model, stats, data[0], exact=False, measure_latency=False, max_flip=1.0,
                 sites=[site])
    assert out.removed_sites == [site] and not out.exact
    assert 0 < out.relative_deviation < 1.0


def test_llama_gate_always_off_zeroes_the_mlp_and_always_on_is_approximate():
    model = _llama(mlp_bias=True)
    prod, act = _mlp_names(model, "llama")
    with torch.no_grad():
        for i, b in enumerate([-40.0, 40.0]):  # block 0's gate always OFF, block 1's always ON
            gate = model.get_submodule(prod.format(i))
            gate.weight.mul_(0.01)
            gate.bias.fill_(b)
    data = [_text_batch() for _ in range(2)]
    stats = _quiet(egp_fast.measure_entropy, model, data, progress=False)
    s0, s1 = stats.sites[act.format(0)], stats.sites[act.format(1)]
    assert s0.collapsible and s1.collapsible and s0.kind == s1.kind == "silu"
    assert int((s0.piece == 0).sum()) == 64 and int((s1.piece == 1).sum()) == 64
    # The site is the SiLU on gate_proj's output; up_proj is not its producer.
    g = _quiet(discover_sites, model, data[0])
    assert g.site(act.format(0)).producers == [prod.format(0)]
    out = _quiet(egp_fast.collapse, model, stats, data[0], measure_latency=False, max_flip=1.0)
    removed = {e["site"]: e for e in out.removed if e.get("kind") == "linearize"}
    assert set(removed) == {act.format(0), act.format(1)}
    # SiLU is only approximately linear, but at |z| = 40 it is its identity / zero to float32
    # rounding, which exact=True checks on the example before removing it
    assert removed[act.format(1)]["exact"] and out.exact
    assert out.after["sites"] == 0
    ref, got = _out(model, data[0]), _out(out.model, data[0])
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_easier_round_on_bert():
    import copy

    model = _bert()
    dense = copy.deepcopy(model)
    data = [_text_batch() for _ in range(2)]
    acts = [MODELS["bert"][3].format(i) for i in range(2)]
    stats = _quiet(egp_fast.measure_entropy, dense, data, progress=False)
    assert list(stats.sites) == acts and not any(s.collapsible for s in stats.sites.values())
    lowest = min(acts, key=lambda n: stats.sites[n].entropy)  # EASIER's choice: the lowest entropy
    res = _quiet(egp_fast.prune, model, data, iterations=1, method="easier", progress=False,
                 evaluate=lambda m: 1.0, max_drop=0.5)
    assert len(res.rounds) == 1 and res.rounds[0].removed_sites == [lowest] == res.removed_sites
    assert res.best_round == 0 and res.rounds[0].kept
    g = _quiet(discover_sites, res.model, data[0])
    assert [s.name for s in g.sites] == [a for a in acts if a != lowest]  # the other GELU is still there
    # The removed GELU became the identity (linearization="identity"): the pruned model computes
    # what the dense model computes with that GELU replaced by nn.Identity.
    ref = copy.deepcopy(dense)
    parent, _, child = lowest.rpartition(".")
    setattr(ref.get_submodule(parent), child, torch.nn.Identity())
    for batch in data:
        want, got = _hidden(ref, batch), _hidden(res.model, batch)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), float((got - want).abs().max())
        assert float((_hidden(dense, batch) - want).abs().max()) > 1e-2  # the GELU mattered
        assert torch.allclose(_out(res.model, batch), _out(ref, batch), rtol=1e-5, atol=1e-6)


def _hidden(model, batch):
    """The encoder's last hidden states (the logits of a random tiny BERT are ~1e-3)."""
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states[-1]


def test_docs_worked_example_runs(capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "huggingface.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "docs/huggingface.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "2 sites, 2 producer layers, found by fx trace" in printed
    assert "0.4997" in printed and "8 -> 7 weight layers" in printed


def test_an_untraceable_transformers_model_warns_with_its_real_obstacle():
    # T5's forward has data-dependent control flow; the plain tracer fails earlier, on the
    # **kwargs signature, with an fx-internal message that would tell the user nothing
    config = transformers.T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=1, num_decoder_layers=1,
                                   num_heads=2, vocab_size=100)
    model = transformers.T5Model(config).eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 8)), "decoder_input_ids": torch.randint(0, 100, (2, 4))}
    with pytest.warns(UserWarning, match=r"could not trace T5Model \(TraceError: .*control flow"):
        g = discover_sites(model, batch)
    assert not g.traced and len(g.sites) == 2  # module hooks found the two ReLUs


def test_a_site_linearised_inside_a_module_the_trace_keeps_whole_is_reported():
    # Whisper: fx cannot follow the encoder; once its only GELU is linearised, the encoder holds
    # no activation, the second tracer keeps it whole, and the model traces
    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
        max_target_positions=32, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_features": torch.randn(2, 16, 32, generator=g),
                "decoder_input_ids": torch.randint(3, 100, (2, 4), generator=g)} for _ in range(2)]
    site = "model.encoder.layers.0.activation_fn"
    stats = _quiet(egp_fast.measure_entropy, model, batches, progress=False)
    assert _quiet(egp_fast.linearize, model, stats, sites=[site], how="identity") == [site]
    after = _quiet(egp_fast.measure_entropy, model, batches, progress=False)
    out = _quiet(egp_fast.collapse, model, after, batches[0], measure_latency=False)
    (entry,) = [e for e in out.removed if e["site"] == site]
    assert entry["kind"] == "linearize" and "not folded" in entry["note"]
