"""Train a small convolutional network on the scikit-learn digits in PyTorch, with fastopt's fused
AdamW and batch norm (fused with the ReLU that follows it), and print the test accuracy.

Run: python examples/torch_cnn.py          (needs: pip install -e '.[torch,demo]')
The same run: fastopt train --framework torch
"""

import torch
from torch import nn

import fastopt.torch
import fastopt.torch.demo
from fastopt.demo import load_digits

data = load_digits()
x_train = torch.from_numpy(data.x_train).float().reshape(-1, 1, 8, 8)
y_train = torch.from_numpy(data.y_train).long()
x_test = torch.from_numpy(data.x_test).float().reshape(-1, 1, 8, 8)
y_test = torch.from_numpy(data.y_test).long()

torch.manual_seed(0)
model = fastopt.torch.demo.cnn()                       # Conv -> BatchNorm2d -> ReLU, twice; pool; Linear
fastopt.torch.convert(model)                           # BatchNorm2d + ReLU -> fastopt.torch.BatchNormReLU2d
opt = fastopt.torch.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)   # a torch.optim.AdamW

for epoch in range(8):
    model.train()
    order = torch.randperm(len(y_train))
    for i in range(0, len(order), 64):
        idx = order[i:i + 64]
        if len(idx) < 2:                               # batch norm needs two values per channel
            continue
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"epoch {epoch + 1}: loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy: {100 * accuracy:.1f}%")
