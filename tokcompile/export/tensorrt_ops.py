"""TensorRT's ONNX parser: which operators and data types it imports, as data for `tensorrt_check`.

Transcribed from onnx-tensorrt's `docs/operators.md` (the support matrix the parser ships with); `SOURCE` says
which revision. `NOTES` keeps the restrictions the doc states for operators our graphs use or that INT4 export
emits; the rest of the matrix (per-operator type lists, other restrictions) is not encoded.
"""

from __future__ import annotations

SOURCE = {
    "repository": "onnx/onnx-tensorrt",
    "file": "docs/operators.md",
    "ref": ("the TensorRT 10.15 GA revision (header: TensorRT 10.15 supports opset 9 to opset 24; "
            "docs/Changelog.md dates 10.15 GA 2026-02-02), read from a stored copy without its commit id; "
            "every row was diffed against tag 10.1-GA, commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c"),
    "tensorrt_version": "10.15",
}
OPSET_RANGE = (9, 24)  # default-domain opsets the parser imports
TOPK_MAX_K = 3840  # TopK operator page: K <= 3840 (operators.md words it as "less than 3840")

# Element types (onnx.TensorProto names). DOUBLE has only limited support (cast down to FLOAT, clamped to
# +-FLT_MAX); INT8, INT4, FP8 and FP4 are quantized types, read only through DequantizeLinear.
DATA_TYPES = frozenset({
    "FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "INT8", "INT4", "FLOAT8E4M3FN", "FLOAT4E2M1", "BOOL"
})
QUANTIZED_TYPES = frozenset({"INT8", "INT4", "FLOAT8E4M3FN", "FLOAT4E2M1"})
IO_ONLY_TYPES = frozenset({"UINT8"})  # only as a network input or output
DEQUANTIZE_TYPES = ("INT8", "INT4", "FLOAT8E4M3FN", "FLOAT4E2M1")  # DequantizeLinear x: INT8, FP8, FP4, INT4

# Inputs that must be build-time constants (initializers), by operator: input index. TopK's K has its own rule.
CONST_INPUTS = {
    "CumSum": (1,), "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,),
    "ReduceMax": (1,), "ReduceMean": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceSum": (1,),
    "ReduceSumSquare": (1,),
}

NOTES = {  # the doc's restriction text, for operators our graphs use or INT4 export emits
    "TopK": "`sorted` must be 1. `K` input must be less than 3840.",
    "DequantizeLinear": "`x_zero_point` must be zero. (Types: INT8, FP8, FP4, INT4.)",
    "QuantizeLinear": "`y_zero_point` must be 0",
    "CumSum": "`axis` must be a build-time constant",
    "ReduceMax": "`axes` must be an initializer",
    "ReduceMean": "`axes` must be an initializer",
    "ReduceSum": "`axes` must be an initializer",
    "Squeeze": "`axes` must be resolvable to a constant.",
    "Unsqueeze": "`axes` must be resolvable to a constant.",
    "ScatterND": "`reduction` other than `none` is not supported",
    "LayerNormalization": "Only the first output `Y` is supported.",
    "RotaryEmbedding": "`position_ids` must be INT64",
    "Attention": ("`Q`, `K`, `V` and `attn_mask` must be 4D. `past_key`, `past_value` and `nonpad_kv_seqlen` "
                  "inputs are unsupported. `present_key`, `present_value` and `qk_matmul_output` outputs are "
                  "unsupported."),
    "Constant": "`sparse_value`, `value_string`, and `value_strings` attributes are unsupported.",
    "If": "Output tensors of the two conditional branches must have the same rank and must have different names",
    "Loop": ("Scan output length cannot be dynamic. The shape of Loop carried dependencies must be the same across "
             "all loop iterations."),
}
# TensorRT's Dequantize operator page adds: the scale is a build-time constant, a scalar (per tensor), 1-D (per
# channel) or of the input's rank for block quantization, blocked on the last or second-to-last axis; only
# symmetric quantization (zero points all zero); INT4 is weight-only.

SUPPORTED = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention",
    "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace",
    "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten",
    "Floor", "GRU", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool",
    "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "HammingWindow", "HannWindow",
    "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsInf",
    "IsNaN", "LRN", "LSTM", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop",
    "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish",
    "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "PRelu", "Pad",
    "ParametricSoftplus", "Pow", "QuantizeLinear", "RMSNormalization", "RNN", "RandomNormal", "RandomNormalLike",
    "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu",
    "Reshape", "Resize", "ReverseSequence", "RoiAlign", "RotaryEmbedding", "Round", "STFT", "ScaledTanh", "Scan",
    "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size",
    "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan",
    "Tanh", "TensorScatter", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample",
    "Where", "Xor"
})
UNSUPPORTED = frozenset({  # listed "N" in the matrix
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "CenterCropPad",
    "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat",
    "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique"
})
