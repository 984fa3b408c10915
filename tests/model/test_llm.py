"""Tokenizer loading, LLM building (config and folder), LoRA, merge, and the HF text encoder."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2ForCausalLM

from medvlm3d.config import LLMConfig, LoRAConfig, TrainablePolicy
from medvlm3d.model.llm import (
    IMAGE_TOKEN,
    LLM_ARCHS,
    TextEncoder,
    apply_lora,
    build_llm,
    embed_tokens,
    load_tokenizer,
    merge_lora,
    unwrap_base,
)
from medvlm3d.model.trainable import apply_trainable_policy, count_parameters

CORPUS = [
    "the liver shows a small hypodense lesion",
    "no lesion in the left lung",
    "a nodule in the right kidney",
    "findings: normal spleen and pancreas",
] * 4


def _bpe_tokenizer(with_eos: bool = True) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>"] if with_eos else ["<unk>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    kw = {"bos_token": "<s>", "eos_token": "</s>"} if with_eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", **kw)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw tokenizer folder: no <image>, no pad token."""
    d = tmp_path_factory.mktemp("tok")
    _bpe_tokenizer().save_pretrained(str(d))
    return d


def _cfg(tok_dir: Path, **kw) -> LLMConfig:
    base = dict(tokenizer=str(tok_dir), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=64)
    return LLMConfig(**{**base, **kw})


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record (and refuse) any socket connection attempt."""
    attempts: list = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def _ids(n: int = 2, length: int = 6, vocab: int = 40) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------
# tokenizer


def test_load_tokenizer_adds_image_token_and_pad(tok_dir: Path) -> None:
    raw = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    tok = load_tokenizer(_cfg(tok_dir))
    assert len(tok) == len(raw) + 1
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == len(tok) - 1
    assert IMAGE_TOKEN in tok.all_special_tokens
    # the placeholder is never split, wherever it sits in the text
    ids = tok("the liver<image>lesion " + IMAGE_TOKEN)["input_ids"]
    assert ids.count(image_id) == 2
    assert tok.pad_token == tok.eos_token == "</s>"


def test_load_tokenizer_is_idempotent_after_save(tok_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(_cfg(tok_dir))
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(LLMConfig(tokenizer=str(tmp_path)))
    assert len(again) == len(tok)
    assert again.convert_tokens_to_ids(IMAGE_TOKEN) == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert again.pad_token_id == tok.pad_token_id


def test_load_tokenizer_without_eos_adds_pad_token(tmp_path: Path) -> None:
    _bpe_tokenizer(with_eos=False).save_pretrained(str(tmp_path))
    tok = load_tokenizer(LLMConfig(tokenizer=str(tmp_path)))
    assert tok.pad_token == "<pad>"
    assert tok.pad_token_id not in (None, tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.unk_token_id)


def test_missing_paths_fail_fast_without_network(tmp_path: Path, no_network: list) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match="no local folder"):
        load_tokenizer(LLMConfig())
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(LLMConfig(tokenizer=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(LLMConfig(path="org/some-hub-model"))  # looks like a hub id: never fetched
    with pytest.raises(ValueError, match="is empty"):
        load_tokenizer(LLMConfig(tokenizer=str(tmp_path)))
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        load_tokenizer(LLMConfig(tokenizer=str(tmp_path)))
    with pytest.raises(ValueError, match="no config.json"):
        build_llm(LLMConfig(path=str(tmp_path)), tokenizer=None)
    with pytest.raises(ValueError, match="does not exist"):
        TextEncoder(str(tmp_path / "bert"))
    assert no_network == []
    assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------------------------------------
# LLM from config / folder


@pytest.mark.parametrize("arch, cls", [("llama", LlamaForCausalLM), ("qwen2", Qwen2ForCausalLM)])
def test_build_from_config_forward_backward_with_inputs_embeds(tok_dir: Path, arch: str, cls: type) -> None:
    torch.manual_seed(0)
    tok = load_tokenizer(_cfg(tok_dir))
    model = build_llm(_cfg(tok_dir, arch=arch, num_kv_heads=2), tok)
    assert isinstance(model, cls)
    assert model.get_input_embeddings().weight.shape == (len(tok), 32)
    assert model.get_output_embeddings().weight.shape == (len(tok), 32)
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 2
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    assert model.config.tie_word_embeddings is False
    assert model.config._attn_implementation == "sdpa"

    ids = _ids()
    embeds = embed_tokens(model, ids).detach().requires_grad_(True)  # visual tokens would be spliced here
    out = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.shape == (2, 6, len(tok))
    out.loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_unknown_arch_lists_registered() -> None:
    assert {"llama", "qwen2"} <= set(LLM_ARCHS.names())
    with pytest.raises(ValueError, match="llama"):
        LLM_ARCHS.get("gpt9")


def test_build_from_folder_resizes_embeddings_for_image_token(tok_dir: Path, tmp_path: Path) -> None:
    raw = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    raw.pad_token = raw.eos_token
    small = build_llm(_cfg(tok_dir), raw)  # an "external" LM that has never seen <image>
    assert small.get_input_embeddings().weight.shape[0] == len(raw)
    small.save_pretrained(str(tmp_path / "lm"))
    raw.save_pretrained(str(tmp_path / "lm"))

    cfg = LLMConfig(path=str(tmp_path / "lm"), dtype="bfloat16")
    tok = load_tokenizer(cfg)  # tokenizer comes from `path` too
    model = build_llm(cfg, tok)
    assert len(tok) == len(raw) + 1
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.dtype == torch.bfloat16
    # the old rows are kept as they were
    old = small.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight[: len(raw)].float(), old.to(torch.bfloat16).float())


def test_gradient_checkpointing_with_lora_and_frozen_embeddings(tok_dir: Path) -> None:
    tok = load_tokenizer(_cfg(tok_dir))
    model = apply_lora(build_llm(_cfg(tok_dir, gradient_checkpointing=True), tok), LoRAConfig(r=2))
    assert unwrap_base(model).is_activation_checkpointing  # transformers 5 name of is_gradient_checkpointing
    assert model.config.use_cache is False
    assert not model.get_input_embeddings().weight.requires_grad
    model.train()
    ids = _ids()
    model(inputs_embeds=embed_tokens(model, ids), labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # lora_B starts at zero, so lora_A gets a zero gradient on the first step; lora_B must not
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert len(lora_b) == 8 and all(g is not None and g.abs().sum() > 0 for g in lora_b)


# ------------------------------------------------------------------------------------------------
# LoRA


def _lora_model(tok_dir: Path, r: int = 4, arch: str = "llama", seed: int = 0) -> tuple[PeftModel, object]:
    torch.manual_seed(seed)
    tok = load_tokenizer(_cfg(tok_dir))
    model = apply_lora(build_llm(_cfg(tok_dir, arch=arch, num_kv_heads=2), tok), LoRAConfig(r=r, alpha=8))
    # lora_B starts at zero (a no-op adapter); make it non-trivial so the tests can tell
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model.eval(), tok


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_policy_trains_only_adapters_with_expected_count(tok_dir: Path, arch: str) -> None:
    r = 4
    model, _ = _lora_model(tok_dir, r=r, arch=arch)
    assert isinstance(model, PeftModel)
    apply_trainable_policy({"llm": model}, TrainablePolicy(llm="lora"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    targeted = [
        m.base_layer for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") and hasattr(m, "base_layer")
    ]
    assert len(targeted) == 2 * 4  # 2 layers x q/k/v/o
    expected = sum(r * (lin.in_features + lin.out_features) for lin in targeted)
    assert count_parameters({"llm": model})["llm"]["trainable"] == expected
    # k/v are narrower than q/o (2 kv heads of 4): the formula is per Linear, not per layer
    assert {lin.out_features for lin in targeted} == {32, 16}


def test_embed_tokens_same_for_plain_and_peft(tok_dir: Path) -> None:
    model, _ = _lora_model(tok_dir)
    ids = _ids()
    assert torch.equal(embed_tokens(model, ids), embed_tokens(unwrap_base(model), ids))
    assert isinstance(unwrap_base(model), LlamaForCausalLM)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5
def test_lora_save_and_reload_gives_identical_logits(tok_dir: Path, tmp_path: Path) -> None:
    model, tok = _lora_model(tok_dir)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert not torch.allclose(ref, base_logits)  # the adapter does something
    model.save_pretrained(str(tmp_path / "adapter"))
    base = build_llm(_cfg(tok_dir, num_kv_heads=2), tok)
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in unwrap_base(model).state_dict().items()
                          if "lora_" not in k})
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)


def test_merge_gives_same_logits_and_a_plain_model(tok_dir: Path) -> None:
    model, _ = _lora_model(tok_dir)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        merged = merge_lora(model)
        out = merged(input_ids=ids).logits
    assert isinstance(merged, LlamaForCausalLM) and not isinstance(merged, PeftModel)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert merge_lora(merged) is merged  # no adapter: unchanged


def test_unknown_lora_targets_list_the_linear_modules(tok_dir: Path) -> None:
    tok = load_tokenizer(_cfg(tok_dir))
    model = build_llm(_cfg(tok_dir), tok)
    with pytest.raises(ValueError, match=r"query_key_value.*q_proj") as e:
        apply_lora(model, LoRAConfig(target_modules=("query_key_value",)))
    assert "gate_proj" in str(e.value) and "lm_head" in str(e.value)
    with pytest.raises(ValueError, match="empty"):
        apply_lora(model, LoRAConfig(target_modules=()))


# ------------------------------------------------------------------------------------------------
# text encoder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=100, special_tokens=specials))
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tk.token_to_id("[CLS]")), ("[SEP]", tk.token_to_id("[SEP]"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(str(d))
    return d


def test_text_encoder_pools_real_tokens_and_is_frozen(bert_dir: Path) -> None:
    enc = TextEncoder(str(bert_dir))
    assert enc.out_dim == 16
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.encoder.training  # frozen: stays in eval mode (no dropout)
    texts = ["a nodule in the right kidney and the liver shows a small lesion", "no lesion"]
    out = enc(texts)
    assert out.shape == (2, 16) and not out.requires_grad
    alone = enc(["no lesion"])  # padding in the batch does not change the pooled vector
    torch.testing.assert_close(out[1:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])
    cls = TextEncoder(str(bert_dir), out_pooling="cls")(texts)
    assert cls.shape == (2, 16) and not torch.allclose(cls, out)


def test_text_encoder_bad_arguments(bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="out_pooling"):
        TextEncoder(str(bert_dir), out_pooling="max")
    enc = TextEncoder(str(bert_dir), trainable=True)
    assert all(p.requires_grad for p in enc.parameters())
    enc(["a lesion"]).sum().backward()
    assert enc.encoder.embeddings.word_embeddings.weight.grad is not None
    with pytest.raises(ValueError, match="list of strings"):
        enc("a lesion")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="list of strings"):
        enc([])
