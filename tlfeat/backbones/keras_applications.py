"""Every keras.applications ImageNet model that gives pooled features, as one table.

Each row names the Keras class, the module whose `preprocess_input` defines its
input scaling (tests compare ours with it), the native input size, the pooled
feature width, the parameter count of the pooled model (include_top=False,
pooling="avg"), and the preprocessing mode from `tlfeat.backbones.preprocessing`. Models
that scale inside the graph (EfficientNet, EfficientNetV2, MobileNetV3,
ConvNeXt) get "included", so their scaling is never applied twice. Their weights
are downloaded by Keras on first use (network needed), then kept in ~/.keras.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KerasApplication:
    name: str  # the tlfeat backbone name
    keras_class: str  # keras.applications.<keras_class>
    family: str  # keras.applications.<family>.preprocess_input is its preprocessing
    input_size: int
    feature_dim: int
    parameters: int
    preprocessing: str  # a tlfeat.backbones.preprocessing mode


_TABLE = """
resnet50             ResNet50            resnet               224  2048   23587712  caffe
resnet101            ResNet101           resnet               224  2048   42658176  caffe
resnet152            ResNet152           resnet               224  2048   58370944  caffe
resnet50_v2          ResNet50V2          resnet_v2            224  2048   23564800  tf
resnet101_v2         ResNet101V2         resnet_v2            224  2048   42626560  tf
resnet152_v2         ResNet152V2         resnet_v2            224  2048   58331648  tf
vgg16                VGG16               vgg16                224   512   14714688  caffe
vgg19                VGG19               vgg19                224   512   20024384  caffe
densenet121          DenseNet121         densenet             224  1024    7037504  torch
densenet169          DenseNet169         densenet             224  1664   12642880  torch
densenet201          DenseNet201         densenet             224  1920   18321984  torch
inception_v3         InceptionV3         inception_v3         299  2048   21802784  tf
inception_resnet_v2  InceptionResNetV2   inception_resnet_v2  299  1536   54336736  tf
xception             Xception            xception             299  2048   20861480  tf
mobilenet            MobileNet           mobilenet            224  1024    3228864  tf
mobilenet_v2         MobileNetV2         mobilenet_v2         224  1280    2257984  tf
mobilenet_v3_small   MobileNetV3Small    mobilenet_v3         224   576     939120  included
mobilenet_v3_large   MobileNetV3Large    mobilenet_v3         224   960    2996352  included
nasnet_mobile        NASNetMobile        nasnet               224  1056    4269716  tf
nasnet_large         NASNetLarge         nasnet               331  4032   84916818  tf
efficientnet_b0      EfficientNetB0      efficientnet         224  1280    4049571  included
efficientnet_b1      EfficientNetB1      efficientnet         240  1280    6575239  included
efficientnet_b2      EfficientNetB2      efficientnet         260  1408    7768569  included
efficientnet_b3      EfficientNetB3      efficientnet         300  1536   10783535  included
efficientnet_b4      EfficientNetB4      efficientnet         380  1792   17673823  included
efficientnet_b5      EfficientNetB5      efficientnet         456  2048   28513527  included
efficientnet_b6      EfficientNetB6      efficientnet         528  2304   40960143  included
efficientnet_b7      EfficientNetB7      efficientnet         600  2560   64097687  included
efficientnet_v2_b0   EfficientNetV2B0    efficientnet_v2      224  1280    5919312  included
efficientnet_v2_b1   EfficientNetV2B1    efficientnet_v2      240  1280    6931124  included
efficientnet_v2_b2   EfficientNetV2B2    efficientnet_v2      260  1408    8769374  included
efficientnet_v2_b3   EfficientNetV2B3    efficientnet_v2      300  1536   12930622  included
efficientnet_v2_s    EfficientNetV2S     efficientnet_v2      384  1280   20331360  included
efficientnet_v2_m    EfficientNetV2M     efficientnet_v2      480  1280   53150388  included
efficientnet_v2_l    EfficientNetV2L     efficientnet_v2      480  1280  117746848  included
convnext_tiny        ConvNeXtTiny        convnext             224   768   27820128  included
convnext_small       ConvNeXtSmall       convnext             224   768   49454688  included
convnext_base        ConvNeXtBase        convnext             224  1024   87566464  included
convnext_large       ConvNeXtLarge       convnext             224  1536  196230336  included
convnext_xlarge      ConvNeXtXLarge      convnext             224  2048  348147968  included
"""


def _parse(table: str) -> tuple[KerasApplication, ...]:
    rows = []
    for line in table.strip().splitlines():
        name, keras_class, family, size, dim, parameters, mode = line.split()
        rows.append(KerasApplication(name, keras_class, family, int(size), int(dim), int(parameters), mode))
    return tuple(rows)


KERAS_APPLICATIONS: tuple[KerasApplication, ...] = _parse(_TABLE)


def build_keras_application(keras_class: str, weights: str | None, input_shape: tuple[int, int, int]) -> Any:
    """keras.applications.<keras_class> without its classifier, average-pooled, at `input_shape`."""
    import keras

    return getattr(keras.applications, keras_class)(
        include_top=False, pooling="avg", weights=weights, input_shape=input_shape
    )
