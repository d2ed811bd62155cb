import torch

from trainer.data import BOS, EOS, IGNORE, PackedLoader, decode, encode
from trainer.model import SIZES, Transformer, document_causal_mask, model_args, num_params


def test_named_sizes_match_the_paper():
    assert abs(num_params(SIZES["8B"]) / 1e9 - 8.0) < 0.1
    assert abs(num_params(SIZES["70B"]) / 1e9 - 70.6) < 0.5
    assert abs(num_params(SIZES["405B"]) / 1e9 - 405.9) < 1.0
    for name in ("8B", "70B", "405B"):
        a = SIZES[name]
        assert a.rope_theta == 500_000 and a.n_kv_heads == 8 and a.vocab_size == 128256


def test_tiny_model_counts_and_shapes():
    m = Transformer(model_args("tiny"))
    assert sum(p.numel() for p in m.parameters()) == num_params(m.args)
    tok = torch.randint(0, 256, (2, 32))
    assert m(tok, torch.zeros_like(tok)).shape == (2, 32, m.args.vocab_size)


def test_no_attention_across_documents():
    torch.manual_seed(0)
    m = Transformer(model_args("tiny")).eval()
    tok = torch.randint(0, 256, (1, 32))
    docs = torch.zeros_like(tok)
    docs[:, 16:] = 1
    out = m(tok, docs)
    tok2 = tok.clone()
    tok2[:, :16] = torch.randint(0, 256, (1, 16))  # change only the first document
    out2 = m(tok2, docs)
    assert torch.allclose(out[:, 16:], out2[:, 16:], atol=1e-6)
    assert not torch.allclose(out[:, :16], out2[:, :16])
    mask = document_causal_mask(docs)
    assert not mask[0, 0, 20, 5] and mask[0, 0, 20, 17] and not mask[0, 0, 17, 20]


def test_tokenizer_and_loader_resume():
    assert encode("hé")[0] == BOS and encode("hé")[-1] == EOS and decode(encode("hé")) == "hé"
    a = PackedLoader(1, 64, 2, rank=0, world_size=2)
    b = PackedLoader(1, 64, 2, rank=1, world_size=2)
    a1, b1 = a.next_batch(), b.next_batch()
    assert not torch.equal(a1.tokens, b1.tokens)  # ranks read different data
    assert (a1.targets == IGNORE).any()  # no target across a document boundary
    a2 = a.next_batch()
    c = PackedLoader(1, 64, 2, rank=0, world_size=2)
    c.load_state_dict({"position": 4})
    assert torch.equal(c.next_batch().tokens, a2.tokens)
