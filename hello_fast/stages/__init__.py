"""The pipeline's stages, one module each declaring a `Stage` (contract.py), and the report; STAGES names them.

Adding a stage is its module (hello_fast/stages/<name>.py with a `STAGE`) and one line in STAGES: the
pipeline's graph, the `hello-fast <stage>` commands and their help come from this table. The order the
stages run in is not this table's: hello_fast/pipeline.py derives it from what each stage reads (this
order only breaks ties). Kept free of imports so that `hello-fast --help` does not load torch.
"""

# name: what it does (the CLI's help; "stage N" is the paper's numbering, DESIGN.md's table)
STAGES = {
    "teachers": "stage 0: train a ResNet-18 on the original set and keep its early-epoch checkpoints (weak teachers)",
    "select": "stage 1: choose the distilled images: RDED patch selection (observer: teacher or projector) or random",
    "projector": "stage 2: train LoRA on CLIP or another backbone (tower convs + text-embedding or prototype head) "
                 "against the weak teachers; write the label artifact",
    "refine": "stage 3 (optional): update the distilled images by Eq. 7 within the projector",
    "student": "stage 4: train a student per label source on the distilled images, with labels made online; evaluate",
}
