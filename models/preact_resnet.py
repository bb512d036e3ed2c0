"""PreAct-ResNet18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016), CIFAR
variant with a 3x3 stem: the model of BackdoorBench and of the FMP paper's experiments."""
import torch.nn as nn
import torch.nn.functional as F

from . import register_model
from .layers import ImageClassifier


class PreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(ImageClassifier):
    feature_stages = ('layer1', 'layer2', 'layer3', 'layer4')

    def __init__(self, num_blocks, num_classes, in_channels):
        super().__init__(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, in_planes = [], 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            stride = 1 if i == 0 else 2
            stage = []
            for s in [stride] + [1] * (blocks - 1):
                stage.append(PreActBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward_features(self, x):
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.relu(self.bn(out))


@register_model
def preactresnet18(num_classes, input_shape):
    return PreActResNet((2, 2, 2, 2), num_classes, input_shape[0])
