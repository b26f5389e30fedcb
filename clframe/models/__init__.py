from clframe.models.factory import backbone_names, create_backbone, register_backbone
from clframe.models.mlp import MLP
from clframe.models.resnet import ResNet18

__all__ = ["MLP", "ResNet18", "backbone_names", "create_backbone", "register_backbone"]
