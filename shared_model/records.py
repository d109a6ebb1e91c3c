"""Keys of the Flower records exchanged between server and clients: one place, one convention (kebab-case)."""

ARRAYS = "arrays"  # ArrayRecord: the head's state dict
CONFIG = "config"  # ConfigRecord sent by the server
METRICS = "metrics"  # MetricRecord replied by a client

# config keys (server -> client)
SERVER_ROUND = "server-round"  # injected by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # injected by FedProx
PROPENSITY_ETA = "propensity-eta"  # position-bias exponent estimated on randomized sessions
LOCAL_EPOCHS = "local-epochs"

# metric keys (client -> server): scalars only, never ids, queries or logs
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
TRAIN_LOSS = "train-loss"
NUM_STEPS = "num-steps"
TRAIN_SECONDS = "train-seconds"  # wall seconds the device spent in local training (benchmarks/fleet_scale.py)
NDCG_GLOBAL = "ndcg@10-global"
NDCG_PERSONAL = "ndcg@10-personal"
PNDCG_GLOBAL = "pndcg@10-global"  # personal-gain NDCG (see training.PNDCG10) of the global head
PNDCG_PERSONAL = "pndcg@10-personal"  # ... of the device's personalized head
MRR_GLOBAL = "mrr-global"
RECALL_GLOBAL = "recall@10-global"

# client context state (stays on the device)
PERSONAL_STATE = "personal-layers"
PARTITION_ID = "partition-id"  # a query reply: which shard a node holds (orders node ids for seeded sampling)
