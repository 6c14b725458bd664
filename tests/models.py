"""Small models and data for optimizer tests."""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyTransformerClassifier(nn.Module):
    """Embedding, LayerNorm, a sequence MLP and a linear head on mean pooling."""

    def __init__(self, vocab=20, d=8, n_classes=3, dropout=0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 12)
        self.fc2 = nn.Linear(12, d, bias=False)
        self.head = nn.Linear(d, n_classes)

    def forward(self, idx):
        h = self.ln(self.emb(idx))
        h = h + self.fc2(self.drop(torch.tanh(self.fc1(h))))
        return self.head(h.mean(1))


def make_data(n=64, T=6, vocab=20, n_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, T), generator=g)
    y = (x[:, 0] % n_classes)
    return TensorDataset(x, y)


def make_setup(opt="sgd", seed=0, n=64, batch_size=16, lr=0.1, dropout=0.0):
    torch.manual_seed(seed)
    model = TinyTransformerClassifier(dropout=dropout)
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    elif opt == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr * 0.1, weight_decay=0.01)
    else:
        optimizer = opt(model.parameters())
    loader = DataLoader(make_data(n=n), batch_size=batch_size, shuffle=False)
    return model, optimizer, loader
