"""Response models of the HTTP API: the documented JSON schema (docs/serving.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Model):
    code: str = Field(description="Stable machine-readable tag, e.g. `not_an_image`.")
    message: str = Field(description="One line for a person.")


class ErrorResponse(_Model):
    error: ErrorBody


class ModelInfo(_Model):
    name: str
    version: str


class ClassScore(_Model):
    name: str = Field(description="Class or readable state this probability is for.")
    probability: float
    threshold: float | None = Field(
        description="Decision threshold (binary / multilabel); null for multiclass (argmax).")
    positive: bool = Field(description="Probability reaches the threshold (or is the argmax).")


class LabelResult(_Model):
    name: str
    kind: Literal["binary", "multiclass", "multilabel"]
    classes: list[str] = Field(description="Binary: [negative state, positive state].")
    decision: str = Field(description="Readable decision, e.g. `needs attention`.")
    probability: float = Field(
        description="The probability of the state named in `probability_of`: binary "
                    "P(positive state) whatever the decision; multiclass P(decided class); "
                    "multilabel the highest class probability.")
    probability_of: str = Field(description="The state / class `probability` is for.")
    threshold: float | None = Field(description="Binary: the saved threshold on "
                                                "P(positive state); else null.")
    present: list[str] = Field(description="Decided class(es); empty when none.")
    scores: list[ClassScore] = Field(
        description="One bar per output: binary 1, multiclass / multilabel one per class.")
    # -- safe outputs (medsig.serve.safe); null when the model folder has none -------------
    state: Literal["confident", "uncertain"] | None = Field(
        None, description="Conformal state: `uncertain` (needs review) when the prediction "
                          "set does not hold exactly one state / class (multilabel: for any "
                          "class); null without conformal data.")
    conformal_set: list[str] | None = Field(
        None, description="Split-conformal prediction set at error rate `alpha` (it holds "
                          "the true state / class for >= 1 - alpha of images like the val "
                          "split). Binary: the plausible states; multiclass: the plausible "
                          "classes; multilabel: the classes whose set is only `present`.")
    uncertain_classes: list[str] | None = Field(
        None, description="Multilabel: the classes whose conformal set is not one state.")
    alpha: float | None = Field(None, description="Conformal error rate of this label.")
    saliency_png: str | None = Field(
        None, description="With `explain=true`: base64 PNG of the image with a heat map "
                          "of where this label's score came from (`explain_method`).")
    saliency_method: str | None = Field(
        None, description="The method that drew `saliency_png`: occlusion, gradcam or "
                          "rollout (`auto`, the default, takes occlusion on a GPU or for a "
                          "small vision tower, rollout for a large one on a CPU).")


class Timing(_Model):
    decode_ms: float = Field(description="Decoding and preprocessing the upload.")
    inference_ms: float = Field(description="Waiting in the batch queue plus the model run.")
    total_ms: float
    batch_size: int = Field(description="Requests served by the same model call.")


class ImageInfo(_Model):
    format: str = Field(description="Sniffed from the bytes: jpeg, png, webp or dicom.")
    bytes: int


class OodChannel(_Model):
    score: float = Field(description="The channel's raw score (a Mahalanobis distance; "
                                     "higher: more unlike the train split).")
    p_value: float = Field(description="How often an in-distribution (val) image scores at "
                                       "least as high on this channel (gamma fit to the "
                                       "val scores); small: unlike.")


class OodResult(_Model):
    score: float = Field(description="How unlike the train split the image is (see "
                                     "/v1/labels `ood.method`; higher: more unlike). With two "
                                     "channels: -log10 of their combined p-value.")
    threshold: float = Field(description="Chosen on val at the saved false-reject rate.")
    flagged: bool = Field(description="Score above the threshold (or a blank image): the "
                                      "image is not assessed and `labels` is empty.")
    blank: bool = Field(False, description="The image is (nearly) uniform: refused "
                                           "whatever its score.")
    channels: dict[str, OodChannel] | None = Field(
        None, description="Per channel (`embedding`, `image_stats`): raw score and p-value; "
                          "null for a one-channel gate (older model folders).")


class PredictResponse(_Model):
    model: ModelInfo
    status: Literal["assessed", "uncertain", "not_assessed"] = Field(
        "assessed", description="`not_assessed`: unlike the images this model was trained "
                                "on (see `ood`), no findings are given; `uncertain`: at "
                                "least one label is uncertain — needs review.")
    ood: OodResult | None = Field(None, description="Out-of-distribution gate; null when "
                                                    "the model folder has none.")
    labels: list[LabelResult] = Field(description="Empty when `status` is `not_assessed`.")
    summary: str = Field(description="Plain-text findings for an LLM prompt, with a caveat.")
    image: ImageInfo
    timing: Timing


class SearchHit(_Model):
    rank: int
    id: str = Field(description="Row id of the indexed case.")
    point_id: str
    score: float = Field(description="Cosine similarity.")
    same_image: bool = Field(description="An image query whose cosine similarity is "
                                         ">= 0.9995: most likely the uploaded image itself "
                                         "(or an exact copy) found in the index.")
    split: str | None = Field(description="The case's split (train / val / test) in the "
                                          "indexed collection; null when it had none.")
    labels: dict[str, Any] = Field(description="Readable label values of the case; "
                                               "`not recorded` where the label is missing, "
                                               "`none` for a multilabel with no class.")
    payload: dict[str, Any] = Field(description="Indexed metadata; `image` is relative to "
                                                "the image root, never an absolute path.")
    thumbnail: str | None = Field(description="URL of a small JPEG, when the image root "
                                              "is known.")


class SearchQuery(_Model):
    """JSON body of POST /v1/search (a text query)."""

    text: str = Field(min_length=1, max_length=2000)
    k: int = Field(5, ge=1, le=50)
    where: list[str] = Field(default_factory=list, max_length=16,
                             description="Filters like the CLI: `key=value`, `key!=v`, "
                                         "`key>=n`; dots for nested keys (`labels.urgency=...`).")
    using: Literal["image", "text"] = Field(
        "image", description="Which indexed vectors to compare with.")


class SearchResponse(_Model):
    query: Literal["image", "text"]
    collection: str
    k: int
    where: list[str]
    hits: list[SearchHit]
    timing: Timing


class EmbedQuery(_Model):
    """JSON body of POST /v1/embed (a text)."""

    text: str = Field(min_length=1, max_length=2000)


class EmbedResponse(_Model):
    input: Literal["image", "text"]
    model: str = Field(description="Encoder that produced the vector (the index's encoder "
                                   "when search is configured).")
    dim: int
    vector: list[float] = Field(description="L2-normalised embedding.")
    timing: Timing


class HeadInfo(_Model):
    name: str
    kind: Literal["binary", "multiclass", "multilabel"]
    classes: list[str]
    thresholds: list[float]
    threshold_rule: str | None = None
    calibration: list[list[float]] | None = Field(
        None, description="Calibration (a, b) per output: p' = sigmoid(a·logit(p) + b) "
                          "(Platt); multiclass: one pair, p' = softmax(a·log p).")
    alpha: float | None = Field(None, description="Conformal error rate.")
    conformal_qhat: list[float | None] | None = Field(
        None, description="Conformal score threshold per output (null: every class).")


class OodInfo(_Model):
    method: str
    threshold: float
    false_reject_target: float = Field(description="Share of in-distribution val images "
                                                   "the threshold refuses.")
    n_reference: int
    channels: list[str] = Field(default_factory=lambda: ["embedding"],
                                description="What the gate scores: `embedding` and, in "
                                            "newer folders, `image_stats`.")
    combine: str | None = Field(None, description="How channel p-values are combined "
                                                  "(`fisher` or `bonferroni`); null with "
                                                  "one channel.")


class LabelsResponse(_Model):
    model: ModelInfo
    heads: list[HeadInfo]
    ood: OodInfo | None = Field(None, description="The OOD gate; null when absent.")


class HealthResponse(_Model):
    status: Literal["ok"]
    model: ModelInfo
    search: bool = Field(description="An index is configured for /v1/search.")
    thumbnails: bool = Field(description="The image root of the index is known.")
    auth_required: bool = Field(description="/v1 routes need an API key.")
    batching: bool
    uptime_s: float
