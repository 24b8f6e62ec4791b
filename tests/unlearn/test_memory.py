"""The memory estimator on a known config: exact parameter counts, and each setting moving the right term."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from qrunlearn.cli import main
from qrunlearn.unlearn import UnlearnConfig
from qrunlearn.unlearn.lora import wrap_lora
from qrunlearn.unlearn.memory import _block_and_root_parameters, estimate_memory, meta_model

# vocabulary 128, hidden 64, MLP 128, 2 blocks, 4 query / 2 key-value heads (key/value width 32), untied head
CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
PER_BLOCK = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q k v o, gate up down, two norms
PARAMS = 128 * 64 + 2 * PER_BLOCK + 64 + 128 * 64  # embeddings, blocks, final norm, head


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("known")
    CONFIG.save_pretrained(path)
    return path


def _cfg(**changes) -> UnlearnConfig:
    base = dict(method="npo", reg="klr", batch_size=2, max_length=100, grad_accum=1, dtype="float32")
    return UnlearnConfig(**{**base, **changes})


def test_parameter_terms_are_exact(model_dir):
    full = estimate_memory(model_dir, _cfg(), device="cpu")
    assert full.parameters == PARAMS == 90_432
    assert (full.weights, full.gradients, full.optimizer, full.reference) == (4 * PARAMS, 4 * PARAMS, 8 * PARAMS,
                                                                            4 * PARAMS)
    lora = estimate_memory(model_dir, _cfg(adapter="lora", lora_r=4), device="cpu")
    peft_model, _ = wrap_lora(LlamaForCausalLM(CONFIG), 4, 8.0, 0.05, None)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora.trainable_parameters == trainable == 8_192
    assert lora.reference == 0 and lora.gradients == 4 * trainable and lora.optimizer == 8 * trainable
    assert lora.tokens_per_micro_batch == full.tokens_per_micro_batch == 2 * 2 * 100  # forget + retain rows


def test_settings_move_the_right_terms(model_dir):
    plain = estimate_memory(model_dir, _cfg(), device="cpu")
    checkpointed = estimate_memory(model_dir, _cfg(gradient_checkpointing=True), device="cpu")
    chunked = estimate_memory(model_dir, _cfg(loss_chunk=10), device="cpu")
    sharded = estimate_memory(model_dir, _cfg(sharding="fsdp"), processes=4, device="cpu")
    offloaded = estimate_memory(model_dir, _cfg(reference_device="cpu"), device="cpu")
    mixed = estimate_memory(model_dir, _cfg(dtype="bfloat16"), device="cpu")
    pure = estimate_memory(model_dir, _cfg(dtype="bfloat16", precision="pure"), device="cpu")
    assert checkpointed.activations < plain.activations and checkpointed.weights == plain.weights
    assert chunked.loss_temporaries < plain.loss_temporaries / 5
    block, root = _block_and_root_parameters(meta_model(model_dir))
    # shards of everything, plus the whole copies FSDP2 gathers: two blocks and the root's own parameters
    assert sharded.weights == plain.weights // 4 + (2 * block + root) * 4 and sharded.optimizer == plain.optimizer // 4
    assert sharded.reference == plain.reference // 4 + block * 4
    assert sharded.activations == plain.activations  # activations are per process, not sharded
    assert offloaded.reference == 0
    assert mixed.weights == 4 * PARAMS + 2 * PARAMS and mixed.optimizer == plain.optimizer  # fp32 master + bf16 copies
    assert pure.weights == 2 * PARAMS and pure.optimizer == 4 * PARAMS
    assert pure.reference == mixed.reference == 2 * PARAMS  # the frozen copy in the compute dtype


def test_cli_estimate_prints_without_training(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    code = main(["unlearn", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--method", "npo",
                 "--reg", "klr", "--estimate", "--processes", "2", "--sharding", "fsdp"])
    out = capsys.readouterr().out
    assert code == 0 and "per process (2 processes" in out and "peak" in out
    assert not any(tmp_path.iterdir())


def test_a_whole_estimate_derived_by_hand(model_dir):
    """NPO+GDR full fine-tuning in fp32, 2 forget + 2 retain rows of 100 positions (400 tokens), no checkpointing,
    no loss chunk, every term worked out from the architecture by hand:
    - weights, gradients 4 x 90,432 = 361,728 bytes each; AdamW 8 x 90,432 = 723,456; no frozen reference (GDR);
    - kept per token and block: two RMSNorms 2 x (4 x 64 + 4 x 64) = 1,024, attention 4 x (64 + 32) + 4 x 3 x 64 +
      4 x 2 x 64 = 1,664, MLP 4 x 4 x 128 = 2,048: 4,736 bytes, so 400 x 2 x 4,736 = 3,788,800, plus the embedding
      output and final norm 400 x 64 x (4 + 4) = 204,800: activations 3,993,600;
    - loss: 3 fp32 copies of the 400 x 128 logits, 614,400, plus the model's own logits 204,800: 819,200;
    - peak: weights + AdamW + the larger of the gradients and activations + loss = 5,897,984 bytes."""
    estimate = estimate_memory(model_dir, _cfg(reg="gdr"), device="cpu")
    assert (estimate.weights, estimate.gradients, estimate.optimizer, estimate.reference) == (
        361_728, 361_728, 723_456, 0)
    assert (estimate.activations, estimate.loss_temporaries, estimate.recompute) == (3_993_600, 819_200, 0)
    assert estimate.total == 5_897_984


def test_checkpointing_counts_the_backward_recompute_beside_the_gradients(model_dir):
    """With checkpointing and a chunked loss the backward pass's recompute is the peak (measured on the tiny model:
    RESULTS.md): all gradients, the kept block inputs, one block's activations and the MLP's gradient temporaries.
    By hand for the known config (fp32, 2 forget + 2 retain rows x 100 positions = 400 tokens):
    gradients 4 x 90,432 parameters = 361,728; block inputs 400 x 2 blocks x 64 x 4 = 204,800; one block's
    activations 400 x 4,736 bytes per token (norms 2 x (4 x 64 + 4 x 64) = 1,024, attention 4 x (64 + 32) + 4 x 3 x
    64 + 4 x 2 x 64 = 1,664, MLP 4 x 4 x 128 = 2,048) = 1,894,400, and the MLP's gradient temporaries 3 x 400 x 128 x 4
    = 614,400: 3,075,328 bytes."""
    plain = estimate_memory(model_dir, _cfg(), device="cpu")
    chunked = estimate_memory(model_dir, _cfg(gradient_checkpointing=True, loss_chunk=10), device="cpu")
    assert plain.recompute == 0
    assert PARAMS == 90_432 and chunked.tokens_per_micro_batch == 400
    assert chunked.recompute == 361_728 + 204_800 + 1_894_400 + 614_400
    assert chunked.total > chunked.weights + chunked.optimizer + chunked.reference + chunked.gradients


def test_each_strategy_adds_what_it_keeps(model_dir):
    """Hand-derived for the known config (fp32, batch 2 forget + 2 retain rows of 100 positions): SURE keeps a
    second gradient (4 bytes x PARAMS) all step and, at the step, 95% of three trainable-sized tensors (the
    unselected rows and their two AdamW moments); QAT keeps each block linear's Q(W) (LoRA too: Q(W0 + s B A), one
    copy); QUAIL the reference's logits over the 2 forget rows and their fp32 difference (2 x 100 x 128 x 8 bytes)."""
    block_linears = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)
    plain = estimate_memory(model_dir, _cfg(), device="cpu")
    assert (plain.strategy_resident, plain.strategy_forward, plain.strategy_step) == (0, 0, 0)
    sure = estimate_memory(model_dir, _cfg(strategy="sure"), device="cpu")
    assert sure.strategy_resident == 4 * PARAMS and sure.strategy_step == int(3 * 4 * PARAMS * 0.95)
    assert estimate_memory(model_dir, _cfg(strategy="sure:percentile=90"), device="cpu").strategy_step == int(
        3 * 4 * PARAMS * 0.90)
    qat = estimate_memory(model_dir, _cfg(strategy="qat:nf4"), device="cpu")
    assert qat.strategy_forward == 4 * block_linears
    lora_qat = estimate_memory(model_dir, _cfg(strategy="lora+qat:nf4", lora_r=4), device="cpu")
    assert lora_qat.strategy_forward == 4 * block_linears
    quail = estimate_memory(model_dir, _cfg(strategy="quail"), device="cpu")
    assert quail.strategy_forward == 2 * 100 * 128 * 8
    assert qat.total > plain.total and quail.total > plain.total
    assert "strategy (kept)" in sure.describe() and "strategy (forward)" in qat.describe()


def test_each_method_adds_what_it_holds(model_dir):
    """Hand-derived for the known config (fp32, batch 2 of 100 positions): UNDIAL holds the reference's logits on the 2
    forget rows and three fp32 tensors of their size (adjusted logits, soft target, log-softmax): 2 x 100 x 128 x
    (4 + 12); RMU's act term the reference's block states on the 2 retain rows (2 x 100 x 64 x 4); IdkDPO's refusal
    twins make 6 rows, not 4; the other methods add nothing."""
    gdr = estimate_memory(model_dir, _cfg(method="ga", reg="gdr"), device="cpu")
    assert gdr.method_forward == 0 and gdr.tokens_per_micro_batch == 4 * 100
    undial = estimate_memory(model_dir, _cfg(method="undial", reg="gdr", loss_chunk=0), device="cpu")
    assert undial.method_forward == 2 * 100 * 128 * 16
    assert undial.total == gdr.total + undial.method_forward + undial.reference  # and its frozen copy
    rmu = estimate_memory(model_dir, _cfg(method="rmu", reg="act"), device="cpu")
    assert rmu.method_forward == 2 * 100 * 64 * 4
    assert estimate_memory(model_dir, _cfg(method="idkdpo", reg="gdr"), device="cpu").tokens_per_micro_batch == 600
    assert "method (forward)" in undial.describe()


def test_lora_qat_keeps_no_dropout_copies(model_dir):
    """LoRA keeps peft's dropout output and its mask, each input-sized, per adapted layer: by hand for the known
    config the adapted layers' input widths are q, k, v, o, gate, up 64 each and down 128, 512 per block, so 400
    tokens x 2 blocks x 512 x (4 + 4) bytes = 3,276,800 on the CPU (the mask is a scaled fp32 copy there: dropout is
    x * mask) and x (4 + 1) = 2,048,000 on CUDA (a bool mask). QAT's quantized forward, F.linear(x, Q(W0 + s B A)),
    applies no dropout: with mix 1 both are gone (measured on the tiny model and SmolLM2: benchmarks/RESULTS.md);
    with mix < 1 the full-precision pass still makes them."""
    lora = estimate_memory(model_dir, _cfg(adapter="lora", lora_r=4), device="cpu")
    no_dropout = estimate_memory(model_dir, _cfg(adapter="lora", lora_r=4, lora_dropout=0.0), device="cpu")
    lora_qat = estimate_memory(model_dir, _cfg(strategy="lora+qat:nf4", lora_r=4), device="cpu")
    mixed = estimate_memory(model_dir, _cfg(strategy="lora+qat:nf4:mix=0.5", lora_r=4), device="cpu")
    assert lora.activations - no_dropout.activations == 400 * 2 * 512 * 8 == 3_276_800
    assert lora_qat.activations == no_dropout.activations
    assert mixed.activations == lora.activations
    on_cuda = [estimate_memory(model_dir, _cfg(adapter="lora", lora_r=4, lora_dropout=dropout), device="cuda")
               for dropout in (0.05, 0.0)]
    assert on_cuda[0].activations - on_cuda[1].activations == 400 * 2 * 512 * 5 == 2_048_000


def test_sure_copy_is_not_beside_the_first_forward(model_dir):
    """SURE's forget-gradient copy exists from the forget term's backward pass to the step, not during a step's first
    forward (measured on SmolLM2-135M: SURE's peak 1.01x full fine-tuning's, RESULTS.md). By hand, known config, full
    FT fp32 NPO+KLR, gradients g = 4 x 90,432 = 361,728 bytes; weights + AdamW + reference = 1,446,912:
    - 2 + 2 rows x 100 positions: the forward's activations 3,993,600 + loss temporaries (6 fp32 copies of the
      400 x 128 logits, 1,228,800, plus the model's own 204,800) = 5,427,200 outweigh SURE's other moments: the
      forget term's backward (activations + its gradient + the copy, 3,993,600 + 2g = 4,717,056) and the step
      (g + the copy g + 95% of 3g, 1,030,924 = 1,754,380), so SURE's peak is plain's: 6,874,112;
    - 1 + 1 rows x 4 positions (8 tokens): activations 8 x 2 x 4,736 + 8 x 64 x 8 = 79,872, loss 8 x 128 x 4 x 7 =
      28,672: the step is the peak, 1,446,912 + 1,754,380 = 3,201,292 (plain: + g = 1,808,640);
    - with 2 micro-batches per step the second forward has the first's gradient and SURE's copy beside it:
      1,446,912 + 5,427,200 + 2g = 7,597,568."""
    assert estimate_memory(model_dir, _cfg(), device="cpu").total == 6_874_112
    assert estimate_memory(model_dir, _cfg(strategy="sure"), device="cpu").total == 6_874_112
    small = dict(batch_size=1, max_length=4)
    assert estimate_memory(model_dir, _cfg(**small), device="cpu").total == 1_808_640
    assert estimate_memory(model_dir, _cfg(strategy="sure", **small), device="cpu").total == 3_201_292
    assert estimate_memory(model_dir, _cfg(strategy="sure", grad_accum=2), device="cpu").total == 7_597_568


def test_accumulation_keeps_gradients_beside_the_forward(model_dir):
    """Gradients are freed after the optimizer step, so with several backward passes per step (grad_accum > 1, or
    QAT's full-precision pass before the quantized one, mix < 1) a later forward runs beside them. By hand, known
    config, full FT fp32 NPO+KLR, 2 + 2 rows x 100 positions: 1,446,912 (weights, AdamW, reference) + 5,427,200
    (activations and loss temporaries) + 361,728 (gradients) = 7,235,840, against 6,874,112 with one pass per step;
    QAT adds each block linear's Q(W), 4 x 81,920 (the test above) = 327,680."""
    block_linears = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)
    assert estimate_memory(model_dir, _cfg(grad_accum=4), device="cpu").total == 7_235_840
    assert estimate_memory(model_dir, _cfg(strategy="qat:nf4"), device="cpu").total == 6_874_112 + 4 * block_linears
    assert estimate_memory(model_dir, _cfg(strategy="qat:nf4:mix=0.5"), device="cpu").total == (
        7_235_840 + 4 * block_linears)
    lora = estimate_memory(model_dir, _cfg(adapter="lora", lora_r=4, grad_accum=8), device="cpu")
    assert lora.accumulating and "accumulation" in lora.describe()
