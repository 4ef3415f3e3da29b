"""Image transforms for evaluation (deterministic resize) and relational training (augmented)."""
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(image_size: int) -> T.Compose:
    """Resize to a square `image_size`, convert to a tensor and normalise with ImageNet statistics."""
    return T.Compose([
        T.Resize((image_size, image_size)),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def train_transform(image_size: int, min_scale: float = 0.8, max_scale: float = 1.0,
                    horiz_flip: float = 0.5, jitter: float = 0.8, prob_jitter: float = 0.5,
                    grayscale: float = 0.1) -> T.Compose:
    """The authors' training augmentation: random resized crop, flip, colour jitter, grayscale."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(min_scale, max_scale)),
        T.RandomHorizontalFlip(horiz_flip),
        T.RandomApply([T.ColorJitter(jitter, jitter, jitter, 0.1)], p=prob_jitter),
        T.RandomGrayscale(grayscale),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
