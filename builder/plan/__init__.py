"""Planning stage: ``plan(report, recipe, ranges) -> QuantPlan``."""

from builder.plan.artifact import ActivationQuant, NodePlan, PegGroup, QuantPlan, WeightQuant
from builder.plan.flops import gemm_flops
from builder.plan.planner import plan

__all__ = ["ActivationQuant", "NodePlan", "PegGroup", "QuantPlan", "WeightQuant", "gemm_flops", "plan"]
