"""msgpack codecs, created once per process (msgspec encoders and decoders are reusable and fast)."""

from typing import Any

import msgspec

from schemas import ebpf
from schemas import messages as m

encoder = msgspec.msgpack.Encoder()

invoke_request = msgspec.msgpack.Decoder(m.InvokeRequest)
node_invoke = msgspec.msgpack.Decoder(m.NodeInvoke)
acks = msgspec.msgpack.Decoder(m.Acks)
invoke_result = msgspec.msgpack.Decoder(m.InvokeResult)
heartbeat = msgspec.msgpack.Decoder(m.Heartbeat)
deploy_request = msgspec.msgpack.Decoder(m.DeployRequest)
deploy_result = msgspec.msgpack.Decoder(m.DeployResult)
upload_bundle = msgspec.msgpack.Decoder(m.UploadBundle)
upload_result = msgspec.msgpack.Decoder(m.UploadResult)
remove_function = msgspec.msgpack.Decoder(m.RemoveFunction)
remove_result = msgspec.msgpack.Decoder(m.RemoveResult)
function_removed = msgspec.msgpack.Decoder(m.FunctionRemoved)
logs_request = msgspec.msgpack.Decoder(m.LogsRequest)
logs_result = msgspec.msgpack.Decoder(m.LogsResult)
describe_request = msgspec.msgpack.Decoder(m.DescribeRequest)
describe_result = msgspec.msgpack.Decoder(m.DescribeReply | m.ErrorReply)
recent_request = msgspec.msgpack.Decoder(m.RecentRequest)
recent_result = msgspec.msgpack.Decoder(m.RecentReply | m.ErrorReply)
list_functions = msgspec.msgpack.Decoder(m.ListFunctions)
list_result = msgspec.msgpack.Decoder(m.ListResult)
status_request = msgspec.msgpack.Decoder(m.StatusRequest)
status_result = msgspec.msgpack.Decoder(m.StatusResult)
function_record = msgspec.msgpack.Decoder(m.FunctionRecord)
node_record = msgspec.msgpack.Decoder(m.NodeRecord)
scheduler_record = msgspec.msgpack.Decoder(m.SchedulerRecord)
verify_request = msgspec.msgpack.Decoder(ebpf.VerifyRequest)
verify_result = msgspec.msgpack.Decoder(ebpf.VerifyReply | m.ErrorReply)
maps_request = msgspec.msgpack.Decoder(ebpf.MapsRequest)
maps_result = msgspec.msgpack.Decoder(ebpf.MapsReply | m.ErrorReply)
revoke_request = msgspec.msgpack.Decoder(ebpf.RevokeRequest)
revoke_result = msgspec.msgpack.Decoder(ebpf.RevokeReply | m.ErrorReply)
replica_beat = msgspec.msgpack.Decoder(m.ReplicaBeat)
set_tenant = msgspec.msgpack.Decoder(m.SetTenant)
drain_node = msgspec.msgpack.Decoder(m.DrainNode)
drain_result = msgspec.msgpack.Decoder(m.DrainReply | m.ErrorReply)
tenant_result = msgspec.msgpack.Decoder(m.TenantResult)
tenant_record = msgspec.msgpack.Decoder(m.TenantRecord)
where_is = msgspec.msgpack.Decoder(m.WhereIs)
have_it = msgspec.msgpack.Decoder(m.HaveIt)


def encode(obj: Any) -> bytes:
    return encoder.encode(obj)
