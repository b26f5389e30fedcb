from clframe.models.causal_lm import CausalLMBackbone
from clframe.models.factory import backbone_names, create_backbone, register_backbone
from clframe.models.mlp import MLP
from clframe.models.pretrained import PretrainedFeatures
from clframe.models.resnet import ResNet18

__all__ = ["MLP", "CausalLMBackbone", "PretrainedFeatures", "ResNet18", "backbone_names", "create_backbone", "register_backbone"]
