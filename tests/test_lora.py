"""LoRA (Hu et al. 2021) and activation checkpointing in model.py: adapters off == the base model;
an optimizer step moves only the adapters (and a reward head); merged weights == the adapted model,
also through a Hugging Face export; checkpoints keep the adapters; checkpointed blocks give the same
loss and gradients, with dropout too (the recompute draws the forward's masks).
Run: python -m pytest -q tests/test_lora.py"""

import pytest
import torch
import torch.nn.functional as F

import model as M


def base(family="qwen2"):
    torch.manual_seed(0)
    return M.GPT(M.family_config(family, vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32,
                                 n_kv_head=2, n_inner=48)).eval()


def adapted(model, rank=4):
    m = M.add_lora(model, rank, alpha=8.0)
    with torch.no_grad():  # trained-looking adapters: B away from its zero init
        for name, p in m.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
    return m.eval()


X = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def test_fresh_adapters_and_adapters_off_equal_the_base():
    b = base()
    assert torch.equal(M.add_lora(b, 4).eval()(X), b(X))  # B = 0 at init
    m = adapted(b)
    assert not torch.allclose(m(X), b(X), atol=1e-3)
    with M.adapters_off(m):
        assert torch.equal(m(X), b(X))
    assert not torch.allclose(m(X), b(X), atol=1e-3)  # back on after the block
    n_lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    assert n_lora == 2 * 4 * ((32 + 64) + (32 + 32) + (32 + 96) + (48 + 32))  # r (in + out) per target


def test_a_step_changes_only_the_adapters():
    m = adapted(base())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = M.configure_optimizer(m, lr=1e-2, weight_decay=0.1)
    loss = F.cross_entropy(m(X[:, :-1]).flatten(0, 1), X[:, 1:].flatten())
    loss.backward()
    opt.step()
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert len(changed) == 2 * 4 * 2  # A and B of 4 targets in 2 layers
    rm = M.add_lora(M.ScalarModel(base().config), 4)  # a reward model trains its head as well
    assert {n for n, p in rm.named_parameters() if p.requires_grad} - {"head.weight", "head.bias"} == \
        {n for n in dict(rm.named_parameters()) if ".lora_" in n}


def test_merged_weights_and_export_equal_the_adapted_model(tmp_path):
    m = adapted(base())
    merged = M.merge_lora(m).eval()
    assert merged.config.lora_rank == 0 and not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(merged(X), m(X), atol=1e-5)
    m.save_pretrained(str(tmp_path))  # merged on export
    back = M.GPT.from_pretrained(str(tmp_path)).eval()
    assert torch.allclose(back(X), m(X), atol=1e-5)


def test_lora_checkpoint_roundtrip(tmp_path):
    m = adapted(base("pythia"))
    tok = M.Tokenizer({bytes([i]): i for i in range(96)})
    M.save_checkpoint(str(tmp_path / "ck"), m, tok, {})
    back, _, info = M.load_checkpoint(str(tmp_path / "ck"))
    assert info["model"]["lora_rank"] == 4 and torch.equal(back.eval()(X), m(X))
    assert {n for n, p in back.named_parameters() if p.requires_grad} == {n for n in dict(m.named_parameters()) if "lora_" in n}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_checkpointing_same_loss_and_gradients(family):
    def loss_and_grads(ckpt):
        torch.manual_seed(0)
        m = M.GPT(M.family_config(family, vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)).train()
        m.activation_checkpointing = ckpt
        ids, mask = M.pad_left([[5, 6, 7, 8, 9], [11, 12]])
        loss = m(ids, mask).square().mean()
        loss.backward()
        return loss, [p.grad for p in m.parameters()]
    (a, ga), (b, gb) = loss_and_grads(False), loss_and_grads(True)
    assert torch.equal(a, b) and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


def test_activation_checkpointing_with_dropout_recomputes_the_same_masks():
    # dropout 0.2 in train mode: the backward's recompute of each block must draw the dropout masks of
    # the forward (torch.utils.checkpoint stashes and restores the RNG state), or the gradients belong
    # to another network than the loss; and the RNG stream after the step must be the one without
    # checkpointing, so the next step's masks are the same too
    def step(ckpt, seed=0):
        torch.manual_seed(0)
        m = M.GPT(M.family_config("gpt2", vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32, dropout=0.2)).train()
        m.activation_checkpointing = ckpt
        ids, mask = M.pad_left([[5, 6, 7, 8, 9], [11, 12]])
        torch.manual_seed(seed)
        loss = m(ids, mask).square().mean()
        loss.backward()
        return loss, [p.grad for p in m.parameters()], torch.rand(3)
    (a, ga, ra), (b, gb, rb) = step(False), step(True)
    assert torch.equal(a, b) and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))
    assert torch.equal(ra, rb)  # the RNG after the step: as without checkpointing
    c, gc, _ = step(True, seed=1)  # other masks: dropout is on, so the check above could fail
    assert not torch.equal(a, c) and not all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gc))
