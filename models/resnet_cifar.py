"""ResNet-20 for CIFAR (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2):
3 stages of 3 basic blocks with 16/32/64 channels, about 0.27M parameters. Downsampling blocks use
1x1 projection shortcuts with BatchNorm (the paper's option B) so the model exercises shortcut
convolutions like PreAct-ResNet18 does, at a fraction of the cost: the CPU-friendly model."""
import torch.nn as nn
import torch.nn.functional as F

from . import register_model
from .layers import ImageClassifier


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(ImageClassifier):
    feature_stages = ('layer1', 'layer2', 'layer3')

    def __init__(self, depth, num_classes, in_channels):
        super().__init__(in_channels)
        assert (depth - 2) % 6 == 0, 'depth must be 6n + 2'
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for s in [1 if i == 0 else 2] + [1] * (n - 1):
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward_features(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        return self.layer3(self.layer2(self.layer1(out)))


@register_model
def resnet20(num_classes, input_shape):
    return CifarResNet(20, num_classes, input_shape[0])
