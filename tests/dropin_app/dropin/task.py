"""dropin: a Flower / PyTorch app.

The model, data and training functions, in the shape of ``flwr new``'s PyTorch template
(``Net``, ``load_data``, ``train``, ``test``). Two differences serve the tests: the model
computes in float64 (a FedTAN round is compared with centralised SGD to 1e-10), and the
data are synthetic, non-IID (two classes per partition, shifted inputs) and made on the
spot, so nothing is downloaded.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 3


class Net(nn.Module):
    """A small CNN with BatchNorm (float64)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, NUM_CLASSES)
        self.double()

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def partition(partition_id: int):
    """Images and labels of a partition: 10 + 6 * partition_id samples of two classes."""
    generator = torch.Generator().manual_seed(1000 + partition_id)
    count = 10 + 6 * partition_id
    labels = (torch.arange(count) % 2 + partition_id) % NUM_CLASSES
    images = torch.randn(count, 1, 8, 8, generator=generator, dtype=torch.float64)
    images += labels.view(-1, 1, 1, 1).double() + 0.5 * partition_id
    return images, labels


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """Train and test DataLoaders of a partition (80% / 20%)."""
    images, labels = partition(partition_id)
    split = int(0.8 * len(labels))
    trainloader = DataLoader(TensorDataset(images[:split], labels[:split]), batch_size=batch_size, shuffle=True)
    testloader = DataLoader(TensorDataset(images[split:], labels[split:]), batch_size=batch_size)
    return trainloader, testloader


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set; the mean training loss."""
    net.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set; loss and accuracy."""
    net.to(device)
    criterion = nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    net.eval()
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            labels = labels.to(device)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
