"""gemminer: lottery tickets at initialization (Gem-Miner and the methods it is measured against).

    from gemminer import GemMiner, finetune
    ticket = GemMiner(density=0.02, epochs=30).find(model, train_batches)
    ticket.apply(model); finetune(model, train_batches, test_batches, epochs=30)
"""

__version__ = "0.1.0"

from gemminer.data import Batches, TensorData, load_dataset
from gemminer.errors import GemminerError
from gemminer.finetune import finetune
from gemminer.init import initialize_weights
from gemminer.masking import prunable_names, remove_masks
from gemminer.methods import METHODS, PruningMethod, SearchResult
from gemminer.methods.dense import Dense
from gemminer.methods.edgepopup import EdgePopup
from gemminer.methods.gemminer import GemMiner, GemMinerConfig
from gemminer.methods.grasp import Grasp
from gemminer.methods.imp import IMP
from gemminer.methods.magnitude import Magnitude
from gemminer.methods.random import RandomTicket
from gemminer.methods.snip import Snip
from gemminer.methods.synflow import SynFlow
from gemminer.models import build_model
from gemminer.ticket import Ticket

__all__ = [
    "IMP",
    "METHODS", "Batches", "Dense", "EdgePopup", "GemMiner", "GemMinerConfig", "GemminerError", "Grasp", "Magnitude",
    "PruningMethod", "RandomTicket", "SearchResult", "Snip", "SynFlow", "TensorData", "Ticket", "build_model",
    "finetune", "initialize_weights", "load_dataset", "prunable_names", "remove_masks",
]
