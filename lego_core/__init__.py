"""lego_core: Model Disassembling and Assembling (MDA) as a plain PyTorch library.

Capture a trained classifier (`load_source_model`), locate the component of
every class (`locate`; `locate_checked` also checks the components against
their source and relaxes the thresholds where they cut too deep), cut out the
component of any class set (`disassemble`), assemble components of several
models into one classifier (`assemble`), and export it as a self-contained
`.pt` (`export_model`). No web, database or task-queue code lives here.
"""

from lego_core.architectures import ARCHITECTURES, build_model, load_state_dict_file
from lego_core.assemble import (
    DEFAULT_SCALING,
    FORMS,
    SCALING_METHODS,
    AssembledModel,
    Part,
    assemble,
)
from lego_core.data import (
    ArchiveLimits,
    ImageFolderData,
    inspect_image_folder,
    load_image_folder,
    shared_data_dir,
)
from lego_core.disassemble import Component, disassemble, full_component
from lego_core.errors import (
    DatasetError,
    IncompatibleComponentsError,
    LegoError,
    ModelFileError,
    UnknownClassError,
)
from lego_core.evaluate import (
    accuracy_on,
    component_stats,
    count_flops,
    count_params,
    evaluate_assembly,
)
from lego_core.export import ExportedClassifier, export_model, load_exported
from lego_core.fidelity import check_components, check_warning, locate_checked
from lego_core.locate import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_SAMPLES_PER_CLASS,
    REFERENCE_ALPHA,
    REFERENCE_BETA,
    Components,
    Locator,
    locate,
)
from lego_core.model import FILE_FORMATS, SourceModel, load_source_model, source_from_module
from lego_core.routes import render_routes, route_table
from lego_core.spec import CIFAR10_SPEC, IMAGENET_SPEC, MNIST_SPEC, InputSpec

__all__ = [
    "ARCHITECTURES",
    "CIFAR10_SPEC",
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_SAMPLES_PER_CLASS",
    "DEFAULT_SCALING",
    "FILE_FORMATS",
    "FORMS",
    "IMAGENET_SPEC",
    "MNIST_SPEC",
    "REFERENCE_ALPHA",
    "REFERENCE_BETA",
    "SCALING_METHODS",
    "ArchiveLimits",
    "AssembledModel",
    "Component",
    "Components",
    "DatasetError",
    "ExportedClassifier",
    "ImageFolderData",
    "IncompatibleComponentsError",
    "InputSpec",
    "LegoError",
    "Locator",
    "ModelFileError",
    "Part",
    "SourceModel",
    "UnknownClassError",
    "accuracy_on",
    "component_stats",
    "assemble",
    "build_model",
    "check_components",
    "check_warning",
    "count_flops",
    "count_params",
    "disassemble",
    "evaluate_assembly",
    "export_model",
    "full_component",
    "inspect_image_folder",
    "load_exported",
    "load_image_folder",
    "load_source_model",
    "load_state_dict_file",
    "locate",
    "locate_checked",
    "render_routes",
    "route_table",
    "shared_data_dir",
    "source_from_module",
]
